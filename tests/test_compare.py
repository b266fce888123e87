import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ringbench.cli import app
from ringbench.report.compare import compare_runs, p_text, render_markdown
from ringbench.run.stats import mann_whitney_p, summarize
from ringbench.vocabulary import Cell

FIXTURE = Path(__file__).parent / "fixtures" / "run"


def test_mann_whitney_matches_hand_computation():
    # U = 0, mean 4.5, variance 9/12·7, z = (4.5 − 0.5)/√5.25: p = erfc(z/√2)
    assert abs(mann_whitney_p([1, 2, 3], [4, 5, 6]) - 0.0808555983700523) < 1e-12
    assert mann_whitney_p([1.0, 2.0], [1.0, 2.0]) == 1.0


def test_a_p_value_past_what_floating_point_resolves_reads_as_a_bound():
    # Thousands of samples a side, wholly apart: the normal tail underflows to exactly 0.
    apart = mann_whitney_p(list(range(3000)), list(range(3000, 6000)))
    assert apart == 0.0 and p_text(apart) == "< 1e-16"
    assert p_text(mann_whitney_p([1, 2, 3], [4, 5, 6])) == "0.081"
    assert p_text(None) == "" and p_text(None, blank="-") == "-"


def changed_run(tmp_path, edit, environment=None):
    new = tmp_path / "new"
    shutil.copytree(FIXTURE, new)
    stored = [json.loads(line) for line in (new / "records.jsonl").read_text().splitlines()]
    for record in stored:
        edit(record)
    (new / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stored))
    if environment:
        meta = json.loads((new / "run.json").read_text())
        meta["environment"].update(environment)
        (new / "run.json").write_text(json.dumps(meta))
    return new


def scale(record, factor):
    record["samples_ms"] = [x * factor for x in record["samples_ms"]]
    record["stats"]["median_ms"] *= factor


def edit(record):
    key = (record["implementation"], record["seq_len"], record["world_size"])
    if key == ("sdpa", 4096, 1):
        scale(record, 2.0)  # clearly slower
    elif key == ("sdpa", 6144, 1):
        scale(record, 1.03)  # a shift below the ratio threshold
    elif key == ("sdpa", 8192, 1):
        scale(record, 0.5)  # clearly faster
    elif key == ("standard", 6144, 1):
        record.update(status="oom", stats=None, samples_ms=[])
    elif key == ("standard", 8192, 1):
        record.update(status="ok", stats=summarize([5.0] * 5), samples_ms=[5.0] * 5)
    elif key == ("ring", 8192, 1) and record["ring_size"] == 1:
        # The median moves by 1.128× (0.47 → 0.53 ms), but the samples overlap: not significant.
        record["samples_ms"] = [0.44, 0.53, 0.54, 0.55, 0.49]
        record["stats"]["median_ms"] = 0.53


def test_verdicts_need_ratio_and_significance(tmp_path):
    comparison = compare_runs(FIXTURE, changed_run(tmp_path, edit))
    verdicts = {row["cell"]: row["verdict"] for row in comparison.rows}
    assert verdicts["sdpa backend=flash S=4096 no ring B=1 H=8 D=64 float16 forward"] == "slower"
    assert verdicts["sdpa backend=flash S=6144 no ring B=1 H=8 D=64 float16 forward"] == "unchanged"
    assert verdicts["sdpa backend=flash S=8192 no ring B=1 H=8 D=64 float16 forward"] == "faster"
    assert verdicts["standard S=6144 no ring B=1 H=8 D=64 float16 forward"] == "newly failing"
    assert verdicts["standard S=8192 no ring B=1 H=8 D=64 float16 forward"] == "fixed"
    assert verdicts["ring S=6144 ring 3 B=1 H=8 D=64 float16 forward"] == "still failing"
    assert verdicts["ring S=8192 ring 1 B=1 H=8 D=64 float16 forward"] == "unchanged"
    ring = next(row for row in comparison.rows if row["cell"] == "ring S=8192 ring 1 B=1 H=8 D=64 float16 forward")
    assert ring["ratio"] == pytest.approx(0.53 / 0.47) and ring["p"] == pytest.approx(0.2101, abs=1e-4)
    assert comparison.warnings == []
    markdown = render_markdown(comparison, 1.1, 0.05)
    row = next(line for line in markdown.splitlines() if line.startswith("| sdpa backend=flash S=4096"))
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "sdpa backend=flash S=4096 no ring B=1 H=8 D=64 float16 forward",
        "slower",
        "0.1100",
        "0.2200",
        "2.000",
        "0.015",
    ]


def test_fail_above_gates_ci(tmp_path):
    new = changed_run(tmp_path, edit)
    failing = CliRunner().invoke(
        app, ["compare", str(FIXTURE), str(new), "--fail-above", "1.2", "-o", str(tmp_path / "c.md")]
    )
    assert failing.exit_code == 1 and "2 regression(s) beyond 1.2x or newly failing" in failing.stderr
    assert (tmp_path / "c.md").read_text().startswith("# ringbench compare: `new` against `run`")
    calm = changed_run(tmp_path / "calm", lambda record: None)
    assert CliRunner().invoke(app, ["compare", str(FIXTURE), str(calm), "--fail-above", "1.2"]).exit_code == 0


def test_a_gpu_a_cell_did_not_use_leaves_it_comparable(tmp_path):
    gpus = json.loads((FIXTURE / "run.json").read_text())["environment"]["gpus"]
    larger_host = changed_run(
        tmp_path, lambda record: None, {"gpus": gpus + [{"name": "NVIDIA H200", "memory_mib": 1}]}
    )
    comparison = compare_runs(FIXTURE, larger_host)
    verdicts = {
        row["verdict"] for row in comparison.rows if row["ratio"] is not None and "processes" not in row["cell"]
    }
    assert verdicts == {"unchanged"}  # one process: the first GPU, the same in both
    across = [row["verdict"] for row in comparison.rows if row["ratio"] is not None and "2 processes" in row["cell"]]
    assert across and set(across) == {"incomparable"}  # two processes: the second GPU differs
    assert comparison.warnings == [
        "Different hardware (NVIDIA H100 80GB HBM3 against NVIDIA H100 80GB HBM3, NVIDIA H200): "
        "those cells' timings are not compared."
    ]


def test_different_hardware_is_incomparable_and_versions_warn(tmp_path):
    other_gpu = changed_run(tmp_path, edit, {"gpus": [{"name": "NVIDIA H200", "memory_mib": 1}], "torch": "9.9"})
    comparison = compare_runs(FIXTURE, other_gpu)
    measured = [row for row in comparison.rows if row["ratio"] is not None]
    assert measured and {row["verdict"] for row in measured} == {"incomparable"}
    assert comparison.warnings == [
        "Different hardware (NVIDIA H100 80GB HBM3 against NVIDIA H200): those cells' timings are not compared.",
        "torch differs: 2.9.0 against 9.9.",
    ]


def test_library_settings_set_differently_warn_by_name(tmp_path):
    # FIXTURE predates the kept settings: its allocator setting (none) reads as no setting at all.
    settings = {"library_settings": {"NCCL_MAX_NCHANNELS": "4", "TORCH_NCCL_HIGH_PRIORITY": "1"}}
    comparison = compare_runs(FIXTURE, changed_run(tmp_path, lambda record: None, settings))
    assert {row["verdict"] for row in comparison.rows if row["ratio"] is not None} == {"unchanged"}
    assert comparison.warnings == [
        "NCCL_MAX_NCHANNELS differs: unset against 4.",
        "TORCH_NCCL_HIGH_PRIORITY differs: unset against 1.",
    ]


def test_two_implementations_of_one_run_compare_cell_by_matching_cell():
    multi = Path(__file__).parent / "fixtures" / "multi-process"
    comparison = compare_runs(multi, multi, 1.01, 0.05, ("torch-cp backend=cudnn", "ring kernel=cudnn zigzag=true"))
    rows = {row["cell"]: row for row in comparison.rows}
    # Named by their situation: which implementation is which, the title says.
    forward = rows["S=131072 2 processes B=1 H=16 D=128 bfloat16 forward"]
    # torch-cp's median in base, ring's in new, as recorded.
    assert (forward["base_ms"], forward["new_ms"], forward["verdict"]) == (
        125.32455825805664,
        116.93174743652344,
        "faster",
    )
    assert forward["p"] == pytest.approx(mann_whitney_p(*_samples(multi, "torch-cp", "ring", 2, "forward")))
    # The one-device ring (world size 1) has no torch-cp cell beside it in this run.
    assert rows["S=131072 ring 4 B=1 H=16 D=128 bfloat16 forward"]["verdict"] == "only in new"
    assert render_markdown(comparison, 1.01, 0.05).startswith(
        "# ringbench compare: ring kernel=cudnn zigzag=true in `multi-process` against torch-cp backend=cudnn in "
        "`multi-process`\n"
    )


def _samples(run, base, new, world_size, pass_name):
    stored = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]

    def of(implementation):
        (record,) = [
            r
            for r in stored
            if (r["implementation"], r["world_size"], r["pass"], r["causal"])
            == (implementation, world_size, pass_name, False)
        ]
        return record["samples_ms"]

    return of(base), of(new)


def test_cells_of_several_ring_sizes_each_meet_the_one_cell_of_their_situation():
    comparison = compare_runs(FIXTURE, FIXTURE, labels=("sdpa backend=flash", "ring"))
    met = {row["cell"]: (row["base_ms"], row["verdict"]) for row in comparison.rows}
    # Ring sizes 1 and 3 at 6144 tokens both meet sdpa's cell at 6144; the ring of 3 ran out of memory.
    assert met["S=6144 ring 1 B=1 H=8 D=64 float16 forward"][0] == met["S=6144 ring 3 B=1 H=8 D=64 float16 forward"][0]
    assert met["S=6144 ring 3 B=1 H=8 D=64 float16 forward"][1] == "newly failing"
    assert met["S=8192 2 processes B=1 H=8 D=64 float16 forward"] == (None, "only in new")


def test_an_unknown_label_is_a_clear_error_naming_the_run_and_its_labels():
    result = CliRunner().invoke(app, ["compare", str(FIXTURE), str(FIXTURE), "--labels", "nope", "ring"])
    assert result.exit_code == 2
    assert (
        f"{FIXTURE}: no cells labelled 'nope' (its labels: ring, sdpa backend=flash, standard, torch-cp backend=flash)"
        in result.stderr
    )


def _with_options(record, **options):
    """The record as a later version would store it: its options changed, so its id too."""
    record["options"] = {**record["options"], **options}
    record["cell_id"] = Cell.from_params(record).id


def test_an_option_added_between_runs_pairs_cells_by_label_and_says_so(tmp_path):
    def gain_option(record):
        if record["implementation"] == "ring":
            _with_options(record, transfers="nccl")  # an option added, its default stored
            if (record["seq_len"], record["ring_size"]) == (8192, 1):
                scale(record, 2.0)
        elif record["implementation"] == "sdpa" and record["seq_len"] == 4096:
            record["label"] = "sdpa backend=cudnn"  # another label: another cell, not paired
            _with_options(record, backend="cudnn")

    comparison = compare_runs(FIXTURE, changed_run(tmp_path, gain_option))
    verdicts = {row["cell"]: row["verdict"] for row in comparison.rows}
    assert verdicts["ring S=8192 ring 1 B=1 H=8 D=64 float16 forward"] == "slower"
    assert verdicts["ring S=6144 ring 1 B=1 H=8 D=64 float16 forward"] == "unchanged"
    assert verdicts["ring S=8192 2 processes B=1 H=8 D=64 float16 forward"] == "unchanged"
    assert verdicts["ring S=6144 ring 3 B=1 H=8 D=64 float16 forward"] == "still failing"
    assert verdicts["sdpa backend=flash S=4096 no ring B=1 H=8 D=64 float16 forward"] == "only in base"
    assert verdicts["sdpa backend=cudnn S=4096 no ring B=1 H=8 D=64 float16 forward"] == "only in new"
    assert len(comparison.rows) == 13  # the fixture's 12 cells, sdpa's at 4096 once in each run
    assert comparison.warnings == [
        "Cells of ring matched by label and parameters, their stored options differing: transfers=nccl only in new."
    ]
