"""Hostile configs and broken run folders: each ends in one short line naming what is wrong, exit
code 2, no traceback, and nothing written. Every input is generated here."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ringbench.cli import app

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "run"

VALID = """\
implementations: [standard]
seq_lens: [32]
heads: [1]
head_dims: [8]
dtypes: [float32]
timing: {warmup_ms: 1, rep_ms: 2, min_reps: 2, max_reps: 3}
"""


def with_key(text: str) -> str:
    """The valid config with one top-level key replaced (or added) by ``text``."""
    key = text.split(":", 1)[0]
    kept = [line for line in VALID.splitlines() if not line.startswith(f"{key}:")]
    return "\n".join(kept) + "\n" + text + "\n"


def alias_bomb(levels: int) -> str:
    lines = ["x: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "anchors:\n" + textwrap.indent("\n".join(lines), "  ") + "\n"


# (id, config text, what the one line must contain)
CONFIGS = [
    ("alias bomb in seq_lens", alias_bomb(9) + with_key("seq_lens: *a9"), "expands to more than 100,000 values"),
    ("alias bomb in description", alias_bomb(9) + with_key("description: *a9"), "expands to more than 100,000 values"),
    (
        "alias bomb in options",
        alias_bomb(9) + with_key("implementations: [{name: dilated, options: {segment_lengths: *a9}}]"),
        "expands to more than 100,000 values",
    ),
    ("deep nesting", "seq_lens: " + "[" * 20000 + "]" * 20000 + "\n", "nesting deeper than 32 levels"),
    ("nesting 40 levels", with_key("description: " + "[" * 40 + "1" + "]" * 40), "nesting deeper than 32 levels"),
    ("list as key", VALID + "? [a, b]\n: 1\n", "a key must be a plain word"),
    ("mapping as key", VALID + "{a: 1}: 2\n", "a key must be a plain word"),
    (
        "list as option key",
        with_key("implementations: [{name: sdpa, options: {[a]: 1}}]"),
        "a key must be a plain word",
    ),
    ("duplicate key", VALID + "heads: [2]\n", "duplicate key 'heads'"),
    (
        "5000-digit seq_len",
        with_key("seq_lens: [" + "9" * 5000 + "]"),
        "seq_lens[0]: expected a positive integer up to 2^53, got a 5000-digit integer",
    ),
    (
        "5000-digit seed",
        VALID + "seed: " + "1" * 5000 + "\n",
        "seed: expected a non-negative integer up to 2^53, got a 5000-digit integer",
    ),
    (
        "5000-digit timing",
        with_key("timing: {warmup_ms: " + "7" * 5000 + "}"),
        "timing.warmup_ms: expected a finite positive number, got a 5000-digit integer",
    ),
    (
        "5000-digit option",
        with_key("implementations: [{name: dilated, options: {segment_lengths: [" + "8" * 5000 + "]}}]"),
        "implementations[0].options.segment_lengths[0]: expected a positive integer, got a 5000-digit integer",
    ),
    ("2^60 heads", with_key(f"heads: [{2**60}]"), "heads[0]: expected a positive integer up to 2^53"),
    (
        "2^60 segment",
        with_key(f"implementations: [{{name: dilated, options: {{segment_lengths: [{2**60}]}}}}]"),
        "segment_lengths[0]: expected a positive integer",
    ),
    (
        "infinite warm-up",
        with_key("timing: {warmup_ms: .inf}"),
        "timing.warmup_ms: expected a finite positive number, got inf",
    ),
    (
        "nan repetitions",
        with_key("timing: {rep_ms: .nan}"),
        "timing.rep_ms: expected a finite positive number, got nan",
    ),
    (
        "infinite max_ms",
        with_key("timing: {max_ms: .inf}"),
        "timing.max_ms: expected a finite positive number, got inf",
    ),
    (
        "infinite sample",
        with_key("timing: {sample_ms: .inf}"),
        "timing.sample_ms: expected a finite non-negative number, got inf",
    ),
    (
        "negative infinite timeout",
        VALID + "cell_timeout_s: -.inf\n",
        "cell_timeout_s: expected a finite positive number, got -inf",
    ),
    (
        "infinite timeout",
        VALID + "cell_timeout_s: .inf\n",
        "cell_timeout_s: expected a finite positive number, got inf",
    ),
    (
        "nan noise target",
        with_key("timing: {noise_target: .nan}"),
        "timing.noise_target: expected a finite positive number",
    ),
    ("zero heads", with_key("heads: [0]"), "heads[0]: expected a positive integer up to 2^53, got 0"),
    ("negative seq_len", with_key("seq_lens: [-32]"), "seq_lens[0]: expected a positive integer up to 2^53, got -32"),
    ("float head_dim", with_key("head_dims: [8.5]"), "head_dims[0]: expected a positive integer up to 2^53, got 8.5"),
    ("string seq_len", with_key("seq_lens: ['32']"), "seq_lens[0]: expected a positive integer up to 2^53, got '32'"),
    ("bool batch", VALID + "batch_sizes: [true]\n", "batch_sizes[0]: expected a positive integer up to 2^53, got True"),
    ("null axis", with_key("heads: null"), "heads: expected a list, got None"),
    ("mapping axis", with_key("heads: {a: 1}"), "heads: expected a list, got {'a': 1}"),
    ("empty axis", with_key("dtypes: []"), "dtypes: must not be empty"),
    (
        "long string shown short",
        with_key("seq_lens: " + "x" * 100_000),
        "seq_lens: expected a list, got 'xxxxxxxxxxxxxxxxxxxxxxxx",
    ),
    (
        "long list shown short",
        with_key("heads: [" + ", ".join(["'h'"] * 5000) + "]"),
        "heads[0]: expected a positive integer",
    ),
    (
        "unknown dtype",
        with_key("dtypes: [float8]"),
        "dtypes[0]: must be one of float16, bfloat16, float32, float64 (got 'float8')",
    ),
    ("unknown pass", VALID + "passes: [sideways]\n", "passes[0]: must be one of forward, backward, forward+backward"),
    ("non-bool causal", VALID + "causal: [1]\n", "causal[0]: expected true or false, got 1"),
    ("unknown device", VALID + "device: tpu\n", "device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("device list", VALID + "device: [cuda]\n", "device: expected auto, cpu, cuda or cuda:N, got ['cuda']"),
    ("unknown top-level key", VALID + "sequence_lengths: [1]\n", "sequence_lengths: unknown key"),
    ("unknown timing key", with_key("timing: {warmup: 1}"), "timing.warmup: unknown key"),
    ("timing not a mapping", with_key("timing: fast"), "timing: expected a mapping, got 'fast'"),
    (
        "min above max reps",
        with_key("timing: {min_reps: 9, max_reps: 3}"),
        "timing.min_reps: must not exceed max_reps (9 > 3)",
    ),
    (
        "unknown graph mode",
        with_key("timing: {cuda_graph: sometimes}"),
        "timing.cuda_graph: must be one of auto, always, never",
    ),
    ("zero threads", VALID + "threads: 0\n", "threads: expected auto or a positive integer, got 0"),
    ("word threads", VALID + "threads: many\n", "threads: expected auto or a positive integer, got 'many'"),
    (
        "absolute output root",
        VALID + "output_root: /etc\n",
        "output_root: must be relative to where ringbench runs (got '/etc')",
    ),
    ("home output root", VALID + "output_root: ~/results\n", "output_root: must be relative to where ringbench runs"),
    ("climbing output root", VALID + "output_root: a/../../b\n", "output_root: must not climb out with '..'"),
    ("blank output root", VALID + "output_root: ''\n", "output_root: expected a folder path, got ''"),
    ("output root list", VALID + "output_root: [a]\n", "output_root: expected a string, got ['a']"),
    ("no implementations", with_key("implementations: []"), "implementations: must not be empty"),
    ("implementations mapping", with_key("implementations: {standard: 1}"), "implementations: expected a list"),
    ("implementation number", with_key("implementations: [7]"), "implementations[0]: expected a mapping, got 7"),
    (
        "unknown implementation",
        with_key("implementations: [attention9000]"),
        "implementations[0].name: unknown implementation 'attention9000'",
    ),
    (
        "unknown option",
        with_key("implementations: [{name: sdpa, options: {tile: 64}}]"),
        "implementations[0].options.tile: unknown option for 'sdpa'",
    ),
    (
        "option of the wrong type",
        with_key("implementations: [{name: ring, options: {zigzag: 'yes'}}]"),
        "implementations[0].options.zigzag: expected bool, got 'yes'",
    ),
    (
        "option list of strings",
        with_key("implementations: [{name: dilated, options: {dilation_rates: [a]}}]"),
        "dilation_rates[0]: expected a positive integer, got 'a'",
    ),
    (
        "options not a mapping",
        with_key("implementations: [{name: sdpa, options: [1]}]"),
        "implementations[0].options: expected a mapping, got [1]",
    ),
    (
        "unknown implementation key",
        with_key("implementations: [{name: sdpa, speed: 11}]"),
        "implementations[0].speed: unknown key",
    ),
    (
        "two-line label",
        with_key('implementations: [{name: sdpa, label: "a\\nb"}]'),
        "implementations[0].label: expected a one-line label",
    ),
    (
        "duplicate label",
        with_key("implementations: [{name: sdpa, label: x}, {name: standard, label: x}]"),
        "implementations[1].label: 'x' already labels implementations[0]",
    ),
    (
        "same implementation twice",
        with_key("implementations: [sdpa, {name: sdpa, label: again}]"),
        "implementations[1]: same implementation and options as implementations[0]",
    ),
    (
        "every cell left out",
        with_key("implementations: [{name: ring}]") + "ring_sizes: [3]\n",
        "no cell to run, every combination is left out: seq_len 32 is not divisible by ring_size 3 (1×)",
    ),
    (
        "dilated left out everywhere",
        with_key("implementations: [{name: dilated, options: {segment_lengths: [24], dilation_rates: [1]}}]"),
        "no cell to run, every combination is left out: seq_len 32 is not divisible by segment length 24 (1×)",
    ),
    ("top-level list", "- 1\n- 2\n", "expected a mapping of config keys at the top level"),
    ("top-level scalar", "hello\n", "expected a mapping of config keys at the top level"),
    ("empty file", "", "expected a mapping of config keys at the top level"),
    ("invalid YAML", "seq_lens: [1, 2\n", "invalid YAML"),
    ("tab indentation", "timing:\n\twarmup_ms: 1\n", "invalid YAML"),
    ("undefined alias", with_key("seq_lens: *nowhere"), "invalid YAML: found undefined alias 'nowhere'"),
    ("python object tag", with_key("seq_lens: !!python/object/apply:os.system ['echo hi']"), "invalid YAML"),
    (
        "plugin not a name",
        VALID + "plugins: ['../evil']\n",
        "plugins[0]: expected the name of a Python file beside the config, without .py, got '../evil'",
    ),
    (
        "plugin dotted",
        VALID + "plugins: [os.path]\n",
        "plugins[0]: expected the name of a Python file beside the config",
    ),
    ("plugin missing", VALID + "plugins: [nowhere]\n", "plugins[0]: cannot read"),
    ("plugin a number", VALID + "plugins: [3]\n", "plugins[0]: expected a string, got 3"),
]

PLUGINS = [  # (id, plugin source, what the one line must contain)
    ("plugin exits", "import sys\nsys.exit(7)\n", "plugin hostile_plugin ("),
    ("plugin interrupts", "raise KeyboardInterrupt\n", "failed on import: KeyboardInterrupt"),
    ("plugin raises", "raise RuntimeError('x' * 100000)\n", "failed on import: RuntimeError: xxxxxxx"),
    ("plugin syntax error", "def (:\n", "failed on import: SyntaxError"),
    (
        "plugin registers a clash",
        "from ringbench import register\n@register('sdpa')\ndef setup(p):\n    return None\n",
        "hostile_plugin.py): implementation 'sdpa' is already registered",
    ),
]


def one_line_exit_2(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert message.endswith("\n") and message.count("\n") == 1, message[:2000]
    assert len(message.encode()) <= 600, message[:2000]
    assert expected in message, message
    assert "Traceback" not in result.output


def only(folder: Path, names: set[str]) -> None:
    """Nothing was written in ``folder`` beyond ``names``."""
    assert {path.name for path in folder.iterdir()} == names


@pytest.mark.parametrize("text, expected", [case[1:] for case in CONFIGS], ids=[case[0] for case in CONFIGS])
def test_hostile_configs_end_in_one_line(tmp_path, monkeypatch, text, expected):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    for command in (["plan", str(path)], ["run", str(path)]):  # plan and run check alike
        one_line_exit_2(CliRunner().invoke(app, command), expected)
    only(tmp_path, {"hostile.yaml"})


def test_an_oversized_or_unreadable_config_is_one_line(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(VALID + "#" * (2**20))
    one_line_exit_2(CliRunner().invoke(app, ["plan", str(big)]), "config is larger than 1 MiB")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    one_line_exit_2(CliRunner().invoke(app, ["plan", str(binary)]), "cannot read config")
    one_line_exit_2(CliRunner().invoke(app, ["plan", str(tmp_path)]), "cannot read config")
    one_line_exit_2(CliRunner().invoke(app, ["plan", str(tmp_path / "absent.yaml")]), "cannot read config")


@pytest.mark.parametrize("source, expected", [case[1:] for case in PLUGINS], ids=[case[0] for case in PLUGINS])
def test_plugins_that_fail_in_any_way_end_in_one_line(tmp_path, monkeypatch, source, expected):
    (tmp_path / "hostile_plugin.py").write_text(source)
    path = tmp_path / "hostile.yaml"
    path.write_text(VALID + "plugins: [hostile_plugin]\n")
    monkeypatch.chdir(tmp_path)
    one_line_exit_2(CliRunner().invoke(app, ["run", str(path)]), expected)
    only(tmp_path, {"hostile.yaml", "hostile_plugin.py"})


def test_nothing_beside_a_config_runs_unless_named_and_a_plugin_cannot_shadow_a_module(tmp_path):
    folder, elsewhere = tmp_path / "shared", tmp_path / "work"
    folder.mkdir()
    elsewhere.mkdir()
    marker = tmp_path / "executed"
    for name in ("git", "yaml", "os"):  # what ringbench imports, or the stamp reads through
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    path = folder / "sweep.yaml"

    def run(text: str) -> subprocess.CompletedProcess:
        path.write_text(text)
        command = [sys.executable, "-c", "from ringbench.cli import main; main()", "run", str(path), "--dry-run"]
        return subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=120)

    assert run(VALID).returncode == 0
    assert not marker.exists()
    # Named, a plugin runs from its file under a name of its own: `os` stays the standard library's.
    named = run(VALID + "plugins: [os]\n")
    assert named.returncode == 0, named.stderr
    assert marker.read_text() == "os"


def test_a_device_that_is_not_there_fails_plan_and_run_alike(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu.yaml"
    path.write_text(VALID + "device: cuda:0\n")
    monkeypatch.chdir(tmp_path)
    for command in (["plan", str(path)], ["run", str(path)]):
        one_line_exit_2(CliRunner().invoke(app, command), "device: 'cuda:0' requested but no CUDA device is available")
    only(tmp_path, {"gpu.yaml"})


def _broken(tmp_path: Path, how: str) -> Path:
    run = tmp_path / "runs" / "20260101T000000Z-broken"
    shutil.copytree(FIXTURE_RUN, run)
    meta, records = run / "run.json", run / "records.jsonl"
    if how == "missing run.json":
        meta.unlink()
    elif how == "empty run.json":
        meta.write_text("")
    elif how == "truncated run.json":
        meta.write_text(meta.read_text()[:200])
    elif how == "foreign run.json":
        meta.write_text(json.dumps([1, 2, 3]))
    elif how == "run.json missing keys":
        meta.write_text(json.dumps({"config": {}, "environment": {}}))
    elif how == "binary run.json":
        meta.write_bytes(b"\xff\xfe\x00\x01")
    elif how == "run.json a folder":
        meta.unlink()
        meta.mkdir()
    elif how == "garbage record":
        records.write_text(records.read_text() + "this is not json\n")
    elif how == "foreign record":
        records.write_text(records.read_text() + "[1, 2]\n")
    return run


BROKEN_META = [
    "missing run.json",
    "empty run.json",
    "truncated run.json",
    "foreign run.json",
    "run.json missing keys",
    "binary run.json",
    "run.json a folder",
]


@pytest.mark.parametrize("how", BROKEN_META)
@pytest.mark.parametrize("command", ["report", "compare", "resume"])
def test_broken_run_folders_end_in_one_line(tmp_path, monkeypatch, how, command):
    run = _broken(tmp_path, how)
    good = tmp_path / "runs" / "20260102T000000Z-good"
    shutil.copytree(FIXTURE_RUN, good)
    monkeypatch.chdir(tmp_path)
    arguments = {
        "report": ["report", str(run), "-q"],
        "compare": ["compare", str(good), str(run)],
        "resume": ["run", "--resume", str(run)],
    }[command]
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    expected = str(run / "run.json")
    if how in ("missing run.json", "run.json a folder"):
        expected = "holds no ringbench run" if command == "report" else "not a run folder"
    one_line_exit_2(CliRunner().invoke(app, arguments), expected)
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("how", ["garbage record", "foreign record"])
def test_compare_of_broken_records_ends_in_one_line(tmp_path, how):
    run = _broken(tmp_path, how)
    lines = len((run / "records.jsonl").read_text().splitlines())
    result = CliRunner().invoke(app, ["compare", str(FIXTURE_RUN), str(run)])
    one_line_exit_2(result, f"{run / 'records.jsonl'}:{lines}: not a record")


def test_output_paths_get_their_folders_and_a_folder_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    nested = tmp_path / "a" / "b" / "report.md"
    assert CliRunner().invoke(app, ["report", str(run), "-o", str(nested), "-q", "--no-plots"]).exit_code == 0
    assert nested.read_text().startswith("# ringbench: golden")
    (tmp_path / "taken").mkdir()
    for arguments in (
        ["report", str(run), "-o", str(tmp_path / "taken"), "-q"],
        ["compare", str(run), str(run), "-o", str(tmp_path / "taken")],
    ):
        one_line_exit_2(CliRunner().invoke(app, arguments), f"{tmp_path / 'taken'}: is a folder; name a file to write")
    compared = tmp_path / "c" / "d" / "compare.md"
    assert CliRunner().invoke(app, ["compare", str(run), str(run), "-o", str(compared)]).exit_code == 0
    assert compared.read_text().startswith("# ringbench compare")
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.glob("*.png"))


def test_a_garbled_records_file_is_reported_in_a_few_lines_and_the_rest_renders(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    with open(run / "records.jsonl", "ab") as stream:
        stream.write(b"\xff\xfe garbage\n" * 1000 + b'{"cut off mid-wri')
    result = CliRunner().invoke(app, ["report", str(run), "-q", "--no-plots"])
    assert result.exit_code == 0 and "Traceback" not in result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 6 and warnings[-1] == f"warning: {run / 'records.jsonl'}: 996 more lines like these"
    assert "**Cells**: 12 of 12 planned recorded" in (run / "report.md").read_text()
