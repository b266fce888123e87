"""What a config, a plugin or a results folder may make ringbench do: nothing beyond measuring."""

import ast
from pathlib import Path

import yaml

from ringbench.sweep import config

PACKAGE = Path(__file__).parents[1] / "ringbench"


def calls_in_package():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                yield path.relative_to(PACKAGE.parent), node


def test_no_shell_and_no_unsafe_yaml_anywhere_in_the_package():
    offences = []
    for where, call in calls_in_package():
        name = ast.unparse(call.func)
        if any(
            keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)
            for keyword in call.keywords
        ):
            offences.append(f"{where}:{call.lineno}: {name}(shell=...)")
        if name in ("os.system", "os.popen", "eval", "exec", "yaml.unsafe_load", "yaml.full_load", "pickle.loads"):
            offences.append(f"{where}:{call.lineno}: {name}")
        if name == "yaml.load":  # only with a loader that builds plain data
            loader = next((ast.unparse(k.value) for k in call.keywords if k.arg == "Loader"), None)
            if loader is None or not issubclass(
                getattr(config, loader.removeprefix("config."), object), yaml.SafeLoader
            ):
                offences.append(f"{where}:{call.lineno}: yaml.load(Loader={loader})")
    assert offences == []
