"""The README's plugin example must work as written."""

import re
from pathlib import Path

from typer.testing import CliRunner

from ringbench.cli import app

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_plugin_example_runs(tmp_path):
    python = re.search(r"```python\n# my_attention.py\n(.*?)```", README, re.S).group(1)
    yaml = re.search(r"```yaml\n# my_sweep.yaml\n(.*?)```", README, re.S).group(1)
    (tmp_path / "my_attention.py").write_text(python)
    (tmp_path / "my_sweep.yaml").write_text(yaml + "timing: {warmup_ms: 1, rep_ms: 2, min_reps: 2, max_reps: 3}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "my_sweep.yaml"), "--output-root", str(out)])
    assert result.exit_code == 0, result.output
    report = CliRunner().invoke(app, ["report", str(out), "-q"])
    assert report.exit_code == 0
    (run_dir,) = [path for path in out.iterdir() if path.is_dir()]
    markdown = (run_dir / "report.md").read_text()
    assert re.search(
        r"^\| chunked chunks=2 +\| no ring +\| +[0-9.]+ ± [0-9.]+ \| +[0-9.]+ ± [0-9.]+ \|$", markdown, re.M
    )
    assert "Failed cells" not in markdown


def test_readme_set_up_commands_match_ci():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    test_command = 'pip install -e ".[test]" && python -m pytest -q'
    assert test_command in README
    assert 'python -m pip install -e ".[test]"' in ci and "python -m pytest -q" in ci


def test_ci_installs_the_cpu_build_the_readme_names_on_the_lowest_and_highest_python():
    root = Path(__file__).parents[1]
    workflow = (root / ".github" / "workflows" / "ci.yml").read_text()
    pyproject = (root / "pyproject.toml").read_text()
    assert "`export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu`" in README
    assert "PIP_EXTRA_INDEX_URL: https://download.pytorch.org/whl/cpu" in workflow and "cache: pip" in workflow
    assert "run: bash .ci/run" in workflow
    declared = sorted(
        re.findall(r'"Programming Language :: Python :: (3\.\d+)"', pyproject),
        key=lambda version: int(version.split(".")[1]),
    )
    assert re.search(r'requires-python = ">=(3\.\d+)"', pyproject).group(1) == declared[0]
    assert re.search(r"python-version: \[(.*)\]", workflow).group(1) == f'"{declared[0]}", "{declared[-1]}"'
    assert f"({declared[0]} and {declared[-1]})" in README
