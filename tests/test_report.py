import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ringbench.cli import app
from ringbench.errors import UserError
from ringbench.report import find_runs, load_run, render_merged, render_report, render_table
from ringbench.report.baseline import with_ratios
from ringbench.report.markdown import escape, fold
from ringbench.report.render import render_findings
from ringbench.report.summary import fastest, headline

FIXTURES = Path(__file__).parent / "fixtures"


def test_fixture_renders_the_golden_markdown_exactly():
    expected = (FIXTURES / "golden_report.md").read_text(encoding="utf-8")
    assert render_report([load_run(FIXTURES / "run")]) == expected


@pytest.mark.parametrize("name", ["sample-grid", "multi-process"])
def test_recorded_runs_render_their_golden_markdown_exactly(name):
    # sample-grid: configs/sweep.yaml on one H200; multi-process: configs/x4-ring-scaling.yaml on four H200s
    # (their samples cut to 8 a cell: the report reads the recorded statistics).
    expected = (FIXTURES / f"{name}.md").read_text(encoding="utf-8")
    assert render_report([load_run(FIXTURES / name)]) == expected


def test_the_sample_grid_tables_fit_in_120_characters():
    markdown = (FIXTURES / "sample-grid.md").read_text(encoding="utf-8")
    widths = [len(line) for line in markdown.splitlines() if line.startswith("|")]
    assert len(widths) > 100 and max(widths) <= 120


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
    assert loaded.warnings[0] == (
        f"{run / 'records.jsonl'}:1: record skipped "
        "(ValueError: schema version 99, newer than this ringbench reads (5))"
    )
    assert loaded.warnings[1].startswith(f"{run / 'records.jsonl'}:{len(lines) + 1}: record skipped (JSONDecodeError")
    assert f"**Cells**: {len(lines) - 1} of {len(lines)} planned recorded" in render_report([loaded])


def test_a_record_outside_the_plan_warns_and_still_renders(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    record = json.loads((run / "records.jsonl").read_text().splitlines()[0])
    stranger = {
        **record,
        "cell_id": "0123456789ab",
        "implementation": "not-installed-here",
        "label": "not-installed-here",
    }
    with open(run / "records.jsonl", "a") as stream:
        stream.write(json.dumps(stranger) + "\n")
    loaded = load_run(run)
    count = len((run / "records.jsonl").read_text().splitlines())
    assert loaded.warnings == [
        f"{run / 'records.jsonl'}:{count}: cell 0123456789ab (not-installed-here) is not in this run's plan"
    ]
    assert "| not-installed-here " in render_report([loaded])


def test_merge_shows_each_cell_once_newest_run_winning(tmp_path):
    old, new = tmp_path / "20260101T000000Z-aaaa", tmp_path / "20260102T000000Z-bbbb"
    shutil.copytree(FIXTURES / "run", old)
    shutil.copytree(FIXTURES / "run", new)
    # The newer run holds only the sdpa cells, each twice as slow.
    kept = []
    for line in (new / "records.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["implementation"] == "sdpa":
            record["stats"]["median_ms"] *= 2
            kept.append(json.dumps(record))
    (new / "records.jsonl").write_text("\n".join(kept) + "\n")
    markdown = render_merged([load_run(old), load_run(new)])
    assert markdown.startswith("# ringbench report: 2 runs merged\n")
    assert "the newest run's record is the one shown. 12 cells in all." in markdown
    assert "| `20260101T000000Z-aaaa` | golden   |" in markdown and markdown.count("| 9             |") == 1
    assert re.search(
        r"^\| sdpa backend=flash +\| no ring +\| +0\.2200 ± 0\.0011 \| +0\.4600 ± 0\.0100 \| +0\.8400 ± 0\.0042 \|$",
        markdown,
        re.M,
    )
    assert "0.1100 ± 0.0011" not in markdown  # the older sdpa record is replaced, not shown beside


def test_html_is_one_page_with_figures_embedded_and_text_kept_inert(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    result = CliRunner().invoke(app, ["report", str(run), "--format", "html", "-q"])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>ringbench: golden</title>" in page
    assert page.count('<img src="data:image/png;base64,') == 4 and not list(run.glob("*.png"))
    # The error message holds <b>bad</b>: it must arrive as text, never as markup.
    assert "&lt;b&gt;bad&lt;/b&gt;" in page and "<b>" not in page
    assert "<table>" in page and '<th style="text-align:left">implementation</th>' in page
    # Legible on a narrow window: scaled to the device, wide tables scrolling in a box of their own.
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert page.count('<div class="wide"><table>') == page.count("<table>") > 10 and ".wide { overflow-x: auto;" in page
    assert "white-space: nowrap;" in page  # cells keep their lines; the box scrolls instead


def test_baseline_names_an_implementation_or_a_label(tmp_path):
    loaded = load_run(FIXTURES / "run")
    markdown = render_report([loaded], baseline="sdpa")
    assert "**Speed-up against `sdpa backend=flash`: its median time over this one**" in markdown
    standard = next(
        line
        for line in markdown.splitlines()[
            markdown.splitlines().index("**Speed-up against `sdpa backend=flash`: its median time over this one**") :
        ]
        if line.startswith("| standard ")
    )
    assert re.match(r"\| standard +\| no ring +\| +0\.09× \| +0\.08× \|", standard)  # 0.11 ms against 1.22 ms
    assert render_report([loaded], baseline="sdpa backend=flash") == markdown
    unknown = CliRunner().invoke(
        app,
        [
            "report",
            str(FIXTURES / "run"),
            "-o",
            str(tmp_path / "r.md"),
            "--no-plots",
            "-q",
            "--baseline",
            "nothing-like-it",
        ],
    )
    assert unknown.exit_code == 2 and not (tmp_path / "r.md").exists()
    assert unknown.stderr.strip() == (
        "--baseline: 'nothing-like-it' is not among the implementations in these runs "
        "(standard, sdpa backend=flash, ring, torch-cp backend=flash)"
    )


def test_the_default_baseline_is_one_the_run_holds(tmp_path):
    run = _fixture_with(tmp_path, lambda record: None)
    lines = [line for line in (run / "records.jsonl").read_text().splitlines() if '"standard"' not in line]
    (run / "records.jsonl").write_text("\n".join(lines) + "\n")
    markdown = render_report([load_run(run)])
    assert "- Best memory reduction against `sdpa backend=flash` at equal shape:" in markdown
    assert "**Speed-up against `sdpa backend=flash`: its median time over this one**" in markdown


def test_several_runs_render_one_section_each(tmp_path):
    for name in ("20260101T000000Z-aaaa", "20260102T000000Z-bbbb"):
        shutil.copytree(FIXTURES / "run", tmp_path / name)
    (tmp_path / "not-a-run").mkdir()
    runs = find_runs([tmp_path])
    assert [run.name for run in runs] == ["20260101T000000Z-aaaa", "20260102T000000Z-bbbb"]
    markdown = render_report([load_run(run) for run in runs])
    assert markdown.startswith("# ringbench report: 2 runs\n")
    assert markdown.count("\n## ringbench: golden\n") == 2 and markdown.count("\n### Findings\n") == 2


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
        "overlap_warnings": [
            "CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue: NCCL kernels and compute kernels serialise"
        ],
        "foreign_processes": [{"pid": "42", "name": "python", "memory_mib": "1024"}],
        "gpu_state": [{"index": "0", "clocks_throttle_reasons.active": "0x0000000000000001"}],
        "gpu_state_end": [{"index": "1", "clocks_throttle_reasons.active": "0x0000000000000004"}],
    }
    assert warnings(pd.DataFrame(columns=COLUMNS), [environment]) == [
        "- CUDA\\_DEVICE\\_MAX\\_CONNECTIONS=1: one hardware queue: NCCL kernels and compute kernels serialise. "
        "Unset it to let communication overlap computation.",
        "- Other processes were computing on the GPUs at the start: python (pid 42, 1024 MiB). They share the GPUs "
        "with the benchmark; stop them and run again.",
        "- GPU 1 reported clock throttle reasons at the start or end (see `gpu_state` in run.json): clocks may have "
        "moved during the run.",
    ]


def test_overlap_breaking_settings_are_noticed(monkeypatch):
    from ringbench.run import env

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.setenv("TORCH_NCCL_ENABLE_TIMING", "0")
    assert env.overlap_warnings() == [
        "CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue: NCCL kernels and compute kernels serialise"
    ]


def test_csv_and_json_hold_one_row_per_cell():
    run = load_run(FIXTURES / "run")
    rows = list(csv.DictReader(io.StringIO(render_table([run], "csv"))))
    assert len(rows) == len(run.frame) and rows[0]["run"] == "run" and rows[0]["implementation"] == "standard"
    assert [row["cell_id"] for row in json.loads(render_table([run], "json"))] == list(run.frame["cell_id"])
    result = CliRunner().invoke(app, ["report", str(FIXTURES / "run"), "--format", "pdf", "-q"])
    assert result.exit_code == 2 and result.stderr.strip() == "--format: expected markdown, html, csv, json, got 'pdf'"


def test_crossovers_name_the_two_lengths_between_which_the_order_changes(tmp_path):
    def faster_standard(record):
        if record["implementation"] == "standard" and record["seq_len"] == 4096:
            record["stats"]["median_ms"] = 0.1  # faster than sdpa (0.11) at 4096, slower from 6144 on

    run = _fixture_with(tmp_path, faster_standard)
    markdown = render_report([load_run(run)])
    assert "- Crossovers:\n" in markdown
    crossings = markdown.split("- Crossovers:\n")[1].split("\n- ")[0].splitlines()
    # standard at 4096 now reads 0.1 ± 0.0122 ms: above the 5% noise target, so what rests on it says so.
    noisy = " — ⚠ rests on a cell timed above the noise target (12.2% IQR / median)"
    assert crossings == [
        f"  - sdpa backend=flash overtakes standard as the fastest between S=4096 and S=6144{noisy}",
        f"  - sdpa backend=flash overtakes `standard` between S=4096 and S=6144{noisy}",
    ]  # ring (ring 1) is wrong at 4096, so it has no measured pair of lengths beside standard; ring (2
    # processes), the fastest at 8192, ran there alone of its lengths, so it overtook nothing


def test_a_runs_headline_keeps_to_its_first_shape_and_names_it_where_shapes_vary():
    frame = load_run(FIXTURES / "run").frame
    assert headline(frame) == "fastest at S=8192: ring (2 processes), 0.2600 ms"
    # The faster cell across processes becomes causal: it no longer competes with the non-causal ones.
    frame.loc[frame["world_size"] == 2, "causal"] = True
    assert headline(frame) == "fastest at S=8192 (non-causal): sdpa backend=flash, 0.4200 ms"


def test_a_length_where_one_cell_ran_ranks_nothing():
    frame = with_ratios(load_run(FIXTURES / "run").frame, "standard")
    # As in a longest-sequence search: at 8192 only ring across two processes ran.
    alone = frame[(frame["seq_len"] < 8192) | ((frame["label"] == "ring") & (frame["world_size"] == 2))]
    assert fastest(alone, "standard") == [
        "S=4096: sdpa backend=flash, 0.1100 ms, 11.09× `standard`",
        "S=6144: sdpa backend=flash, 0.2300 ms, 11.83× `standard` — ⚠ rests on a cell timed above the noise "
        "target (7.7% IQR / median)",
    ]
    assert fastest(alone[alone["seq_len"] == 8192], "standard") == ["no length ran more than one cell"]


def test_merged_runs_from_differing_environments_are_flagged(tmp_path):
    old, new = tmp_path / "20260101T000000Z-aaaa", tmp_path / "20260102T000000Z-bbbb"
    shutil.copytree(FIXTURES / "run", old)
    shutil.copytree(FIXTURES / "run", new)
    meta = json.loads((new / "run.json").read_text())
    meta["environment"]["torch"] = "2.99.0"
    (new / "run.json").write_text(json.dumps(meta))
    markdown = render_merged([load_run(old), load_run(new)])
    assert (
        "- The runs shown together differ in torch: compare their cells with care, or rerun them on one machine."
        in markdown
    )


def test_a_results_root_with_garbage_renders_what_it_can(tmp_path):
    shutil.copytree(FIXTURES / "run", tmp_path / "20260101T000000Z-good")
    cut = tmp_path / "20260102T000000Z-cut"
    shutil.copytree(FIXTURES / "run", cut)
    text = (cut / "records.jsonl").read_text()
    (cut / "records.jsonl").write_text(text[: len(text) // 2])  # stopped mid-line
    (tmp_path / "20260103T000000Z-garbage").mkdir()
    (tmp_path / "20260103T000000Z-garbage" / "run.json").write_bytes(b"\x00\xffnot json")
    (tmp_path / "20260104T000000Z-foreign").mkdir()
    (tmp_path / "20260104T000000Z-foreign" / "run.json").write_text('{"someone": "else"}')
    (tmp_path / "notes.txt").write_text("not a run")
    result = CliRunner().invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "all.md"), "-q", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert (
        f"warning: {tmp_path / '20260103T000000Z-garbage' / 'run.json'}: run skipped, cannot read it" in result.stderr
    )
    assert (
        f"warning: {tmp_path / '20260104T000000Z-foreign' / 'run.json'}: run skipped, not a ringbench run file "
        "(missing config, config_hash, config_source, environment, planned, excluded)"
    ) in result.stderr
    assert f"{cut / 'records.jsonl'}:" in result.stderr and "record skipped (JSONDecodeError" in result.stderr
    markdown = (tmp_path / "all.md").read_text()
    assert markdown.startswith("# ringbench report: 2 runs\n") and markdown.count("## ringbench: golden") == 2
    alone = CliRunner().invoke(app, ["report", str(tmp_path / "20260104T000000Z-foreign")])
    assert alone.exit_code == 2 and "not a ringbench run file" in alone.output


def test_parameters_say_how_long_a_sample_spans(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    meta = json.loads((run / "run.json").read_text())
    meta["config"]["timing"]["sample_ms"] = 1000
    (run / "run.json").write_text(json.dumps(meta))
    line = next(line for line in render_report([load_run(run)]).splitlines() if line.startswith("- **timing**"))
    assert line.endswith("; a sample is the mean of calls lasting at least 1000 ms")


def test_records_without_held_memory_compare_no_memory_in_all(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    for record in records:
        (record.get("memory") or {}).pop("held_mib", None)  # as written before held memory was recorded
    (run / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    markdown = render_report([load_run(run)])
    assert (
        "- Best memory reduction against `standard` at equal shape: not known: these records predate the memory "
        "held when a call starts"
    ) in markdown
    assert "**Memory in all" not in markdown and "**Peak memory of a call" in markdown


def test_a_baseline_that_holds_least_memory_is_no_reduction(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    for record in records:
        if record["implementation"] != "standard" and record.get("memory"):
            record["memory"]["held_mib"] += 4096
    (run / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    line = next(line for line in render_report([load_run(run)]).splitlines() if "Best memory reduction" in line)
    assert line.startswith(
        "- Best memory reduction against `standard` at equal shape: none, no implementation held less in all; "
        "the closest, "
    )


def test_records_without_a_check_or_a_gradient_check_say_so(tmp_path):
    def edit(record):
        if record["implementation"] == "standard" and record["seq_len"] == 4096:
            record["check"] = None  # registered without a reference
        if record["implementation"] == "sdpa" and record["seq_len"] == 4096:
            record["pass"] = "backward"  # as recorded before gradients were checked at every length
            record["check"]["gradients"] = {"checked": False, "reason": "seq_len above 8192", "passed": True}
        if record["implementation"] == "sdpa" and record["seq_len"] == 8192:
            record["pass"] = "backward"
            record["check"]["gradients"] = {
                "checked": True,
                "dq_rel_error": 0.004,
                "dk_rel_error": 0.003,
                "dv_rel_error": 0.002,
                "rel_error": 0.004,
                "passed": True,
            }

    markdown = render_report([load_run(_fixture_with(tmp_path, edit))])
    assert re.search(r"^\| standard +\| no ring +\| +not checked \|", markdown, re.M)
    assert re.search(
        r"^\| sdpa backend=flash +\| no ring +\| +1\.5e-03 / not checked \| +1\.5e-03 / 4\.0e-03 \|$", markdown, re.M
    )


def _fixture_with(tmp_path, edit):
    """A copy of the fixture run whose records ``edit`` changed in place (one dict each)."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    for record in records:
        edit(record)
    (run / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run


def test_a_folder_of_runs_renders_each_report_once_and_again_when_out_of_date(tmp_path):
    old, new = tmp_path / "20260101T000000Z-aaaa", tmp_path / "20260102T000000Z-bbbb"
    shutil.copytree(FIXTURES / "run", old)
    shutil.copytree(FIXTURES / "run", new)
    first = CliRunner().invoke(app, ["report", str(tmp_path), "--no-plots"])
    assert first.exit_code == 0, first.output
    assert first.stderr.count("wrote ") == 3  # both reports and the index
    index = (tmp_path / "index.md").read_text()
    rows = [line for line in index.splitlines() if line.startswith("| [")]
    assert [row.split("]")[0] for row in rows] == [
        "| [20260102T000000Z-bbbb",
        "| [20260101T000000Z-aaaa",
    ]  # newest first
    assert rows[0].endswith("| 9 ok, 3 failed | fastest at S=8192: ring (2 processes), 0.2600 ms |")
    assert "## Findings of `20260102T000000Z-bbbb` (golden)" in first.stdout
    assert (new / "report.md").read_text() == (FIXTURES / "golden_report.md").read_text().replace(
        "`run`", f"`{new.name}`"
    )
    # Rendered again only where the report is older than what it shows.
    second = CliRunner().invoke(app, ["report", str(tmp_path), "-q"])
    assert second.exit_code == 0 and second.stderr.count("wrote ") == 1 and second.stdout == ""
    os.utime(old / "report.md", (0, 0))
    third = CliRunner().invoke(app, ["report", str(tmp_path), "-q"])
    assert f"wrote {old / 'report.md'}" in third.stderr and f"wrote {new / 'report.md'}" not in third.stderr


def test_a_report_is_out_of_date_when_the_code_that_reads_upgrades_or_names_its_records_changes(tmp_path):
    from ringbench.report import index

    run = tmp_path / "20260101T000000Z-aaaa"
    shutil.copytree(FIXTURES / "run", run)
    assert CliRunner().invoke(app, ["report", str(run), "--no-plots", "-q"]).exit_code == 0
    package = Path(index.__file__).parent.parent
    newest = max(path.stat().st_mtime for path in [*package.rglob("*.py"), *run.iterdir()])
    os.utime(run / "report.md", (newest + 10, newest + 10))
    assert index.current(run)
    for code in (package / "schema.py", package / "vocabulary.py", package / "records.py", Path(index.__file__)):
        kept = code.stat()
        os.utime(code, (kept.st_atime, newest + 20))  # edited after the report was written
        try:
            assert not index.current(run), code
        finally:
            os.utime(code, (kept.st_atime, kept.st_mtime))


def test_merged_reports_and_their_figures_stay_out_of_the_results_folder(tmp_path):
    for name in ("20260101T000000Z-aaaa", "20260102T000000Z-bbbb"):
        shutil.copytree(FIXTURES / "run", tmp_path / name)
    merged = CliRunner().invoke(app, ["report", str(tmp_path), "--merge", "-q"])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "report.md").read_text().startswith("# ringbench report: 2 runs merged")
    assert list((tmp_path / "merged").glob("*.png")) and not list(tmp_path.glob("*.png"))
    assert [run.name for run in find_runs([tmp_path])] == ["20260101T000000Z-aaaa", "20260102T000000Z-bbbb"]


def _fixture_meta(tmp_path, edit):
    """A copy of the fixture run whose run.json ``edit`` changed in place."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    meta = json.loads((run / "run.json").read_text())
    edit(meta)
    (run / "run.json").write_text(json.dumps(meta))
    return run


def test_the_stamp_names_the_gpus_the_run_used():
    def two_gpus(meta):
        meta["environment"]["gpus"].append({**meta["environment"]["gpus"][0], "index": 1})

    def one_process(meta):
        two_gpus(meta)
        meta["planned"] = [cell for cell in meta["planned"] if cell.get("world_size", 1) == 1]

    for edit, count in ((two_gpus, 2), (one_process, 1)):
        with tempfile.TemporaryDirectory() as folder:
            markdown = render_report([load_run(_fixture_meta(Path(folder), edit))])
        assert f"**Hardware**: NVIDIA H100 80GB HBM3 ×{count} (81,559 MiB each)" in markdown


def test_throttle_masks_read_as_words(tmp_path):
    def throttled(meta):
        meta["environment"]["gpu_state"][0]["clocks_throttle_reasons.active"] = "0x0000000000000024"
        meta["environment"]["gpu_state_end"][0]["clocks_throttle_reasons.active"] = "0x0000000000001001"

    markdown = render_report([load_run(_fixture_meta(tmp_path, throttled))])
    assert "clocks held back by: software power cap, software thermal slowdown; at the end:" in markdown
    assert "clocks held back by: idle, other (0x1000)\n" in markdown and "0x00000" not in markdown


def test_left_out_rows_show_the_axes_that_tell_them_apart(tmp_path):
    def varied(meta):
        for excluded, dtype in zip(meta["excluded"], ["float16", "bfloat16", "float16", "bfloat16", "float16"]):
            excluded["dtype"] = dtype

    markdown = render_report([load_run(_fixture_meta(tmp_path, varied))])
    left_out = markdown.split("## Left out of the plan\n\n")[1].split("\n\n")[0].splitlines()
    assert re.match(r"\| implementation +\| run as +\| seq_len +\| dtype +\| reason +\|$", left_out[0])
    assert re.match(r"\| ring +\| ring 3 +\| 4096 +\| float16 +\| seq\\_len 4096 is not divisible", left_out[2])
    assert "None" not in markdown


def test_findings_fold_for_a_terminal_between_words_under_each_items_text():
    findings = render_findings(load_run(FIXTURES / "multi-process"))
    assert max(len(line) for line in findings.splitlines()) > 100  # the fixture has lines to fold
    for width in (40, 60, 80, 100):
        assert " ".join(fold(findings, width).split()) == " ".join(findings.split())  # every word, in order
        for line in findings.splitlines():
            first, *rest = fold(line, width).splitlines() or [""]
            text = line.lstrip()
            assert first.startswith(line[: len(line) - len(text)] + text.split(" ")[0])  # the item's own indent
            hang = len(line) - len(text) + (2 if text.startswith("- ") else 0)  # a list item's text
            assert all(len(part) - len(part.lstrip()) == hang for part in rest), (width, line)
            # over the width only as one unbroken word (a path, a cell's title)
            assert all(len(part) <= width or " " not in part.strip() for part in [first, *rest]), (width, line)


def test_the_library_settings_a_run_kept_are_named_under_its_environment(tmp_path):
    settings = {"NCCL_MAX_NCHANNELS": "4", "TORCH_NCCL_HIGH_PRIORITY": "1"}
    for name, environment in [
        ("now", {"library_settings": settings}),
        ("before", {"pytorch_cuda_alloc_conf": "expandable_segments:True"}),  # runs before every setting was kept
    ]:
        run = tmp_path / name
        shutil.copytree(FIXTURES / "run", run)
        meta = json.loads((run / "run.json").read_text())
        meta["environment"].pop("pytorch_cuda_alloc_conf")
        meta["environment"].update(environment)
        (run / "run.json").write_text(json.dumps(meta))
    lines = [
        line
        for name in ("now", "before")
        for line in render_report([load_run(tmp_path / name)], plots_dir=None).splitlines()
        if "library settings" in line
    ]
    assert lines == [
        "- **library settings** from the environment: NCCL\\_MAX\\_NCHANNELS=4, TORCH\\_NCCL\\_HIGH\\_PRIORITY=1",
        "- **library settings** from the environment: PYTORCH\\_CUDA\\_ALLOC\\_CONF=expandable\\_segments:True",
    ]


def test_a_ring_that_chose_its_transfers_says_which_ran_beside_its_communication(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "multi-process", run_dir)
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    for index, transfers in ((8, "copy-engine"), (16, "nccl: the ranks span hosts")):  # the forward rings
        record = json.loads(lines[index])
        record["facts"]["transfers"] = transfers
        lines[index] = json.dumps(record)
    (run_dir / "records.jsonl").write_text("\n".join(lines) + "\n")
    markdown = render_report([load_run(run_dir)], plots_dir=None)
    table = markdown.split("**Communication per rank")[1].split("\n\n", 2)[1]
    assert table == (
        "| implementation                | run as      |                                                   S=131072 |\n"
        "|:------------------------------|:------------|-----------------------------------------------------------:|\n"
        "| ring kernel=cudnn zigzag=true | 2 processes |                512.00 MiB per ring step, 0.0%, copy-engine |\n"
        "| ring kernel=cudnn zigzag=true | 4 processes | 256.00 MiB per ring step, 2.4%, nccl: the ranks span hosts |"
    )
