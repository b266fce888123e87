"""Stopping a run at any moment loses at most the cell in flight; --resume runs exactly what is missing."""

import json
import os
import random
import subprocess
import sys

from conftest import BASE_CONFIG, ROOT, killed_run
from typer.testing import CliRunner

from ringbench import records
from ringbench.cli import app

SLOW = (
    BASE_CONFIG.replace("  - name: standard\n", "  - name: test-slow\n    options: {sleep_ms: 20.0}\n").replace(
        "seq_lens: [64, 96]", "seq_lens: [8, 16, 24, 32, 40, 48]"
    )
    + "plugins: [fake_impls]\n"
)


def lines_of(run_dir):
    return (run_dir / "records.jsonl").read_text().splitlines()


def started_by(run_dir):
    """The ringbench that started the run, as resume's errors name it."""
    started = json.loads((run_dir / "run.json").read_text())["environment"]["ringbench"]
    return f"ringbench {started['version']}" + (f" at commit {started['commit'][:8]}" if started["commit"] else "")


def test_sigkill_at_random_moments_then_resume(write_config):
    path = write_config(SLOW)
    chooser = random.Random(1234)
    for trial in range(3):
        out = path.parent / f"out{trial}"
        run_dir = killed_run(path, out, chooser)
        before = [json.loads(line) for line in lines_of(run_dir) if line.endswith("}")]
        result = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
        assert result.exit_code == 0, result.output
        after = [json.loads(line) for line in lines_of(run_dir)]
        planned = [p["cell_id"] for p in json.loads((run_dir / "run.json").read_text())["planned"]]
        # Every line is a record, and none is lost or there twice.
        assert sorted(r.cell_id for r in records.read_records(run_dir)) == sorted(planned)
        assert after[: len(before)] == before  # finished records untouched
        assert json.loads((run_dir / "run.json").read_text())["resumed"][0]["retry_failed"] is False


def test_retry_failed_reruns_failures_and_the_report_keeps_the_latest(write_config):
    path = write_config(BASE_CONFIG.replace("  - name: standard\n", "  - name: test-oom\n") + "plugins: [fake_impls]\n")
    out = path.parent / "out"
    assert CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)]).exit_code == 0
    (run_dir,) = out.iterdir()
    assert len(lines_of(run_dir)) == 4
    nothing = CliRunner().invoke(app, ["run", str(path), "--resume", str(run_dir)])
    assert nothing.exit_code == 0 and len(lines_of(run_dir)) == 4  # nothing was missing
    retried = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--retry-failed"])
    assert retried.exit_code == 0
    statuses = [record.status for record in records.read_records(run_dir)]
    assert statuses[4:] == ["oom", "oom"]  # only the two failed cells ran again
    CliRunner().invoke(app, ["report", str(run_dir), "-q"])
    markdown = (run_dir / "report.md").read_text()
    assert "**Cells**: 4 of 4 planned recorded" in markdown
    assert markdown.count("**Resumed**: ") == 2 and "(re-running failed cells)" in markdown


def test_a_record_cut_off_by_the_stop_is_dropped(write_config):
    path = write_config()
    out = path.parent / "out"
    assert CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)]).exit_code == 0
    (run_dir,) = out.iterdir()
    complete = lines_of(run_dir)
    (run_dir / "records.jsonl").write_text("\n".join(complete[:2]) + "\n" + complete[2][:50])
    assert CliRunner().invoke(app, ["run", "--resume", str(run_dir)]).exit_code == 0
    resumed = lines_of(run_dir)
    assert resumed[:2] == complete[:2] and len(resumed) == 4 and all(json.loads(line) for line in resumed)
    assert json.loads((run_dir / "run.json").read_text())["resumed"][0]["dropped_partial_record"] is True


def test_resume_refuses_a_changed_config_and_bad_arguments(write_config):
    path = write_config()
    out = path.parent / "out"
    assert CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)]).exit_code == 0
    (run_dir,) = out.iterdir()
    path.write_text(BASE_CONFIG.replace("[64, 96]", "[64, 128]"))
    changed = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert changed.exit_code == 2
    assert changed.stderr.strip() == (
        f"{path}: does not describe the sweep in {run_dir} any more (seq_lens [64, 96] → [64, 128]): the config, "
        f"or the options this ringbench gives its implementations, changed since {started_by(run_dir)} started it"
    )
    alone = CliRunner().invoke(app, ["run", str(path), "--retry-failed"])
    assert alone.exit_code == 2 and alone.stderr.strip() == "--retry-failed goes with --resume RUN_DIR"
    missing = CliRunner().invoke(app, ["run", "--resume", str(out / "nope")])
    assert missing.exit_code == 2 and missing.stderr.strip() == f"{out / 'nope'}: not a run folder (no run.json)"


PLUGIN = """\
from ringbench import Option, register


@register("grown", options={OPTIONS})
def setup(problem):
    return lambda: problem.v
"""


def test_resume_names_what_a_newer_ringbench_sees_otherwise_and_touches_nothing(write_config):
    # Between the run and its resumption the implementation gains an option: the config reads as
    # another (the option's default is part of it), and the cells (their ids hold it) are others.
    path = write_config(BASE_CONFIG.replace("  - name: standard\n", "  - name: grown\n") + "plugins: [grown]\n")
    (path.parent / "grown.py").write_text(PLUGIN.replace("OPTIONS", ""))
    out = path.parent / "out"
    assert CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)]).exit_code == 0
    (run_dir,) = out.iterdir()
    before, meta = lines_of(run_dir), (run_dir / "run.json").read_text()
    (path.parent / "grown.py").write_text(PLUGIN.replace("OPTIONS", '"tiles": Option(2)'))
    grown = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert grown.exit_code == 2 and grown.stderr.strip() == (
        f"{path}: does not describe the sweep in {run_dir} any more (implementations[0] grown → grown(tiles=2)): "
        f"the config, or the options this ringbench gives its implementations, changed since {started_by(run_dir)} "
        "started it"
    )
    assert lines_of(run_dir) == before and (run_dir / "run.json").read_text() == meta
    # The same config planned into other cells (as by a ringbench whose cell ids differ).
    (path.parent / "grown.py").write_text(PLUGIN.replace("OPTIONS", ""))
    stamped = json.loads(meta)
    stamped["planned"][0]["cell_id"] = "0" * 12
    (run_dir / "run.json").write_text(json.dumps(stamped))
    replanned = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert replanned.exit_code == 2 and replanned.stderr.strip() == (
        f"{path}: this ringbench plans other cells from it than {started_by(run_dir)} did for the run in {run_dir}"
    )
    assert lines_of(run_dir) == before


def test_two_runs_writing_into_one_root_at_once_keep_apart(write_config):
    path = write_config(SLOW)
    out = path.parent / "shared"
    command = [sys.executable, "-m", "ringbench", "run", str(path), "--output-root", str(out)]
    processes = [
        subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        for _ in range(2)
    ]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    run_dirs = sorted(out.iterdir())
    assert len(run_dirs) == 2  # started in the same second, they still get a folder each
    for run_dir in run_dirs:
        planned = [p["cell_id"] for p in json.loads((run_dir / "run.json").read_text())["planned"]]
        stored = list(records.read_records(run_dir))
        assert [r.cell_id for r in stored] == planned and all(r.status == "ok" for r in stored)
        assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave nothing half-done behind


def test_resume_works_from_any_working_directory(write_config, tmp_path, monkeypatch):
    path = write_config(BASE_CONFIG)
    monkeypatch.chdir(path.parent)
    assert CliRunner().invoke(app, ["run", path.name, "--output-root", "out"]).exit_code == 0  # config named relatively
    (run_dir,) = (path.parent / "out").iterdir()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["config_source"] == path.name and meta["config_file"] == str(path.resolve())
    lines = lines_of(run_dir)
    (run_dir / "records.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as if stopped after two cells
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["run", "--resume", str(run_dir.resolve())])
    assert result.exit_code == 0, result.output
    assert sorted(r.cell_id for r in records.read_records(run_dir)) == sorted(p["cell_id"] for p in meta["planned"])
