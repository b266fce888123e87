import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BASE_CONFIG
from typer.testing import CliRunner

from ringbench.attention.registry import Registry
from ringbench.cli import app
from ringbench.report.index import terminal_index
from ringbench.report.load import load_run
from ringbench.run import worker

runner = CliRunner()


def test_plan_lists_cells_and_exclusions(write_config):
    text = (
        BASE_CONFIG.replace("  - name: standard\n", "  - name: test-ring\n")
        + "ring_sizes: [1, 3]\nplugins: [fake_impls]\n"
    )
    path = write_config(text)
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{path}: 5 cells planned, 1 left out"
    assert lines[1].endswith("test-ring S=64 ring 1 B=1 H=2 D=16 float32 forward")
    assert lines[-2:] == [
        "left out:",
        "  test-ring S=64 ring 3 B=1 H=2 D=16 float32 forward: seq_len 64 is not divisible by ring_size 3",
    ]
    dry = runner.invoke(app, ["run", str(path), "--dry-run", "--output-root", str(path.parent / "out")])
    assert dry.exit_code == 0 and dry.output == result.output
    assert not (path.parent / "out").exists()


def test_config_error_is_one_line_exit_2_and_writes_nothing(write_config):
    path = write_config(BASE_CONFIG.replace("  - name: sdpa", "  - name: rign"))
    out = path.parent / "out"
    result = runner.invoke(app, ["run", str(path), "--output-root", str(out)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{path}: implementations[1].name: unknown implementation 'rign' "
        f"(known: {', '.join(Registry.bundled().known())})"
    ]
    assert "Traceback" not in result.output and not out.exists()


def test_unavailable_device_is_a_config_error(write_config, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_config(BASE_CONFIG + "device: cuda:1\n")
    result = runner.invoke(app, ["run", str(path), "--output-root", str(path.parent / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{path}: device: 'cuda:1' requested but no CUDA device is available"


def test_run_then_report(write_config):
    path = write_config()
    out = path.parent / "out"
    result = runner.invoke(app, ["run", str(path), "--output-root", str(out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    assert len((run_dir / "records.jsonl").read_text().splitlines()) == 4
    assert result.stdout == f"{run_dir}\n"  # the run folder, for scripts; the progress and table go to stderr
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith("# ringbench: test\n") and "**Cells**: 4 of 4 planned recorded" in markdown
    index = (out / "index.md").read_text()
    assert f"| [{run_dir.name}]({run_dir.name}/report.md) |" in index and "| 4 ok, 0 failed |" in index
    # Printed: the index folded to 80 columns, then the newest run's findings; figures stay in the run's folder.
    listing, findings = report.stdout.split("\n\n## Findings of ", 1)
    heading = f"ringbench runs in {out}, newest first:"
    assert listing.startswith(heading if len(heading) <= 80 else f"ringbench runs, newest first, in\n{out}\n")
    entries = listing.splitlines()[1 if len(heading) <= 80 else 2 :]
    assert " ".join(" ".join(entries).split()).startswith(f"{run_dir.name} · test · ")
    assert "4 ok, 0 failed" in listing and max(len(line) for line in entries) <= 80
    # At any width the run's line folds between its facts, never leaving their separator at either end;
    # the folder of runs stays whole, on a line of its own where the heading does not fit.
    for width in [*range(40, 101), len(heading)]:
        folded = terminal_index([load_run(run_dir)], out, width).splitlines()
        fits = width >= len(heading)
        assert folded[: 1 if fits else 2] == ([heading] if fits else ["ringbench runs, newest first, in", str(out)])
        assert max(len(line) for line in folded[1 if fits else 2 :]) <= width
        assert not any(line.lstrip().startswith("·") or line.endswith("·") for line in folded), width
    assert findings.startswith(f"`{run_dir.name}` (test)\n")
    assert not list(out.glob("*.png")) and list(run_dir.glob("*.png"))
    missing = runner.invoke(app, ["report", str(path.parent / "nothing")])
    assert missing.exit_code == 2 and missing.stderr.strip() == f"{path.parent / 'nothing'}: no such folder"


def _started_slow_run(write_config):
    """A run of slow cells, once it has written three records: (process, records file)."""
    text = BASE_CONFIG.replace("  - name: standard\n", "  - name: test-slow\n") + "plugins: [fake_impls]\n"
    path = write_config(text.replace("seq_lens: [64, 96]", "seq_lens: [8, 16, 24, 32, 40, 48, 56, 64]"))
    out = path.parent / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "ringbench", "run", str(path), "--output-root", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    deadline = time.monotonic() + 120
    records_file = None
    while time.monotonic() < deadline:
        found = list(out.glob("*/records.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            records_file = found[0]
            break
        time.sleep(0.05)
    assert records_file is not None, "the run never wrote three records"
    return process, records_file


def test_ctrl_c_keeps_every_finished_record_and_says_how_to_resume(write_config):
    process, records_file = _started_slow_run(write_config)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    lines = records_file.read_text().splitlines()
    assert 3 <= len(lines) < 16 and all(json.loads(line)["status"] == "ok" for line in lines)
    run_dir = records_file.parent
    assert (
        f"interrupted: {len(lines)} finished cells kept in {run_dir}; continue with: ringbench run --resume {run_dir}\n"
        in output
    )
    assert not list(run_dir.glob("inflight-*.json"))
    planned = json.loads((run_dir / "run.json").read_text())["planned"]
    assert [json.loads(line)["cell_id"] for line in lines] == [p["cell_id"] for p in planned[: len(lines)]]


def test_a_second_ctrl_c_stops_at_once_and_corrupts_nothing(write_config):
    process, records_file = _started_slow_run(write_config)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert all(json.loads(line)["status"] == "ok" for line in records_file.read_text().splitlines())
    assert "planned" in json.loads((records_file.parent / "run.json").read_text())


def test_a_worker_refuses_a_config_edited_since_the_run_started(write_config, capsys):
    path = write_config()
    out = path.parent / "out"
    assert CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)]).exit_code == 0
    (run_dir,) = out.iterdir()
    path.write_text(path.read_text().replace("seq_lens: [64, 96]", "seq_lens: [64, 128]"))
    with pytest.raises(SystemExit) as exited:
        worker.main([str(run_dir), str(run_dir / "pending-1.json")])
    assert exited.value.code == 2
    assert f"{path}: changed since the run in {run_dir} started" in capsys.readouterr().err


def test_the_thread_count_and_host_load_are_set_and_recorded(write_config):
    path = write_config(BASE_CONFIG + "threads: 2\n")
    out = path.parent / "out"
    assert CliRunner().invoke(app, ["run", str(path), "--output-root", str(out), "--threads", "1"]).exit_code == 0
    (run_dir,) = out.iterdir()
    environment = json.loads((run_dir / "run.json").read_text())["environment"]
    assert environment["threads"] == 1  # the command line wins over the config
    for load in (environment["host_load"], environment["host_load_end"]):
        assert len(load["load_average"]) == 3 and isinstance(load["busy_processes"], list)
    log = (run_dir / "worker-1.log").read_text()
    assert "1 intra-op thread" in log
    assert CliRunner().invoke(app, ["plan", str(write_config(BASE_CONFIG + "threads: 0\n"))]).exit_code == 2


def test_the_closing_table_reads_at_80_columns_with_labels_whole():
    from rich.console import Console

    from ringbench.progress import summary_table
    from ringbench.schema import Record

    fixture = Path(__file__).parent / "fixtures" / "sample-grid" / "records.jsonl"
    cell_records = [Record.from_json(json.loads(line)) for line in fixture.read_text().splitlines()]
    console = Console(width=80, record=True, color_system=None)
    console.print(summary_table(cell_records))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    # Axes with one value are in the title; the long label wraps within its column, whole.
    lines = text.splitlines()
    assert lines[0].strip() == "ringbench run · float16 · non-causal · forward · B=1 · H=8 · D=64"
    row = lines.index("│ ring-dilated w=1K,2K,4K  │    8192 │ ring 16 │ ok     │    0.1932 │     24.2 │")
    assert lines[row + 1].startswith("│ r=1,2,4                  │         │")


def test_version_names_the_release_and_the_checkout():
    import git

    from ringbench import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    head = git.Repo(Path(__file__).parents[1]).head.commit.hexsha[:12]
    assert result.stdout.startswith(f"ringbench {__version__} (commit {head}")


def test_the_stamp_names_the_configs_repository_and_ringbench_apart(write_config, tmp_path):
    import git

    project = tmp_path / "project"
    project.mkdir()
    path = project / "sweep.yaml"
    path.write_text(write_config().read_text())
    repo = git.Repo.init(project)
    repo.index.add(["sweep.yaml"])
    commit = repo.index.commit("a sweep", author=git.Actor("a", "a@b"), committer=git.Actor("a", "a@b")).hexsha
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(path), "--output-root", str(out)]).exit_code == 0
    (run_dir,) = out.iterdir()
    environment = json.loads((run_dir / "run.json").read_text())["environment"]
    assert environment["git"] == {"commit": commit, "dirty": False} and run_dir.name.endswith(commit[:8])
    ours = git.Repo(Path(__file__).parents[1]).head.commit.hexsha
    assert environment["ringbench"]["commit"] == ours and environment["ringbench"]["version"] == "0.1.0"
    assert runner.invoke(app, ["report", str(run_dir), "-q", "--no-plots"]).exit_code == 0
    markdown = (run_dir / "report.md").read_text()
    assert f"**Git Commit**: {commit[:8]} (the repository holding the config)  \n" in markdown
    assert f"**ringbench**: 0.1.0, commit {ours[:8]}" in markdown
