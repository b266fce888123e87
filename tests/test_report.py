import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ringbench.errors import UserError
from typer.testing import CliRunner

from ringbench.cli import app
from ringbench.report import find_runs, load_run, render_report, render_table
from ringbench.report.markdown import escape

FIXTURES = Path(__file__).parent / "fixtures"


def test_fixture_renders_the_golden_markdown_exactly():
    expected = (FIXTURES / "golden_report.md").read_text(encoding="utf-8")
    assert render_report([load_run(FIXTURES / "run")]) == expected


def test_error_text_cannot_break_the_markdown():
    assert escape("a | b\n<script>*x*</script>") == r"a \| b \<script\>\*x\*\</script\>"
    assert escape("x" * 400, limit=10) == "xxxxxxxxx…"


def test_truncated_last_line_and_foreign_schema_warn_and_still_render(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    lines = (run / "records.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"schema_version": 1', '"schema_version": 99')
    (run / "records.jsonl").write_text("\n".join(lines) + "\n" + lines[1][:40])
    loaded = load_run(run)
    assert len(loaded.frame) == len(lines) - 1
    assert loaded.warnings[0] == f"{run / 'records.jsonl'}:1: record skipped (ValueError: schema version 99, expected 1)"
    assert loaded.warnings[1].startswith(f"{run / 'records.jsonl'}:{len(lines) + 1}: record skipped (JSONDecodeError")
    assert f"**Cells**: {len(lines) - 1} of {len(lines)} planned recorded" in render_report([loaded])


def test_several_runs_render_one_section_each(tmp_path):
    for name in ("20260101T000000Z-aaaa", "20260102T000000Z-bbbb"):
        shutil.copytree(FIXTURES / "run", tmp_path / name)
    (tmp_path / "not-a-run").mkdir()
    runs = find_runs([tmp_path])
    assert [run.name for run in runs] == ["20260101T000000Z-aaaa", "20260102T000000Z-bbbb"]
    markdown = render_report([load_run(run) for run in runs])
    assert markdown.startswith("# ringbench report: 2 runs\n")
    assert markdown.count("\n## ringbench: golden\n") == 2 and markdown.count("\n### Summary\n") == 2


def test_paths_without_runs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="holds no ringbench run"):
        find_runs([tmp_path])
    with pytest.raises(UserError, match="no such folder"):
        find_runs([tmp_path / "missing"])


def test_report_side_never_imports_torch():
    code = "import sys, ringbench.report, ringbench.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_environment_warnings_say_what_to_do():
    import pandas as pd

    from ringbench.report.load import COLUMNS
    from ringbench.report.summary import warnings

    environment = {
        "git": {"commit": "abc", "dirty": False},
        "overlap_warnings": ["CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue: NCCL kernels and compute kernels serialise"],
        "foreign_processes": [{"pid": "42", "name": "python", "memory_mib": "1024"}],
        "gpu_state": [{"index": "0", "clocks_throttle_reasons.active": "0x0000000000000001"}],
        "gpu_state_end": [{"index": "1", "clocks_throttle_reasons.active": "0x0000000000000004"}],
    }
    assert warnings(pd.DataFrame(columns=COLUMNS), environment) == [
        "- CUDA\\_DEVICE\\_MAX\\_CONNECTIONS=1: one hardware queue: NCCL kernels and compute kernels serialise. "
        "Unset it to let communication overlap computation.",
        "- Other processes were computing on the GPUs at the start: python (pid 42, 1024 MiB). They share the GPUs "
        "with the benchmark; stop them and run again.",
        "- GPU 1 reported clock throttle reasons at the start or end (see `gpu_state` in run.json): clocks may have "
        "moved during the run.",
    ]


def test_overlap_breaking_settings_are_noticed(monkeypatch):
    from ringbench import env

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.setenv("TORCH_NCCL_ENABLE_TIMING", "0")
    assert env.overlap_warnings() == [
        "CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue: NCCL kernels and compute kernels serialise"]


def test_csv_and_json_hold_one_row_per_cell():
    run = load_run(FIXTURES / "run")
    rows = list(csv.DictReader(io.StringIO(render_table([run], "csv"))))
    assert len(rows) == len(run.frame) and rows[0]["run"] == "run" and rows[0]["implementation"] == "standard"
    assert [row["cell_id"] for row in json.loads(render_table([run], "json"))] == list(run.frame["cell_id"])
    result = CliRunner().invoke(app, ["report", str(FIXTURES / "run"), "--format", "pdf", "-q"])
    assert result.exit_code == 2 and result.stderr.strip() == "--format: expected markdown, csv or json, got 'pdf'"
