"""The typed record: every committed run reads through it, what it writes reads back equal, version 1
upgrades to the documented defaults, and anything else is refused with a reason."""

import json
from pathlib import Path

import pytest
import torch
from conftest import measure

from ringbench import records
from ringbench.report import load_run, render_report
from ringbench.schema import (
    SCHEMA_VERSION,
    Comm,
    GradientCheck,
    Memory,
    Modes,
    RankFigures,
    RankTraffic,
    Record,
    Stats,
)
from ringbench.sweep.config import TimingBudget
from ringbench.vocabulary import Cell

EVIDENCE = Path(__file__).parents[1] / "results" / "evidence"
COMMITTED_RUNS = sorted(path for path in EVIDENCE.iterdir() if (path / records.RUN_FILE).is_file())
BUDGET = TimingBudget(warmup_ms=1, rep_ms=2, min_reps=2, max_reps=3)


@pytest.mark.parametrize("run_dir", COMMITTED_RUNS, ids=lambda path: path.name)
def test_every_committed_run_reads_as_typed_records_and_renders(run_dir):
    loaded = load_run(run_dir)
    assert loaded.warnings == []
    lines = (run_dir / records.RECORDS_FILE).read_text().splitlines()
    assert len(loaded.frame) == len({json.loads(line)["cell_id"] for line in lines if line.strip()})
    assert render_report([loaded], plots_dir=None).startswith("# ringbench: ")
    for record in records.read_records(run_dir):  # upgraded, they write what reads back equal
        assert Record.from_json(record.to_json()) == record


def test_the_committed_runs_span_several_ages():
    assert len(COMMITTED_RUNS) >= 40
    keys = {
        frozenset(json.loads(line))
        for run in COMMITTED_RUNS
        for line in (run / records.RECORDS_FILE).read_text().splitlines()[:1]
    }
    assert len(keys) >= 5


def _fresh(name, pass_name="forward", ring_size=None, options=()):
    cell = Cell(name, options, 32, ring_size, 1, 2, 8, "float32", False, pass_name, label=f"{name} label")
    return measure(cell, torch.device("cpu"), BUDGET, 0)


@pytest.mark.parametrize(
    "fresh",
    [
        lambda: _fresh(
            "ring", ring_size=4, options=(("kernel", "auto"), ("transfers", "nccl"), ("zigzag", True))
        ),  # a projected rank share
        lambda: _fresh("standard", "backward"),  # gradients checked
        lambda: _fresh(
            "dilated", options=(("dilation_rates", (1, 2)), ("kernel", "auto"), ("segment_lengths", (8, 16)))
        ),
        lambda: _fresh("test-error"),  # a failure
    ],
    ids=["ring", "backward", "dilated", "error"],
)
def test_a_fresh_record_reads_back_equal_and_writes_what_it_always_has(fresh, tmp_path):
    record = fresh()
    with records.RecordWriter(tmp_path) as writer:
        writer.append(record)
    (line,) = (tmp_path / records.RECORDS_FILE).read_text().splitlines()
    stored = json.loads(line)
    assert Record.from_json(stored) == record and stored == json.loads(json.dumps(record.to_json()))
    assert stored["schema_version"] == SCHEMA_VERSION == 5
    assert sorted(stored) == sorted(
        [
            "schema_version",
            "cell_id",
            "implementation",
            "options",
            "seq_len",
            "ring_size",
            "batch_size",
            "heads",
            "head_dim",
            "dtype",
            "causal",
            "pass",
            "world_size",
            "label",
            "device",
            "started_at",
            "duration_s",
            "error",
            "facts",
            "check",
            "warmup_ms",
            "samples_ms",
            "stats",
            "noise",
            "modes",
            "plain",
            "memory",
            "projected",
            "ranks",
            "comm",
            "flops",
            "tflops",
            "tokens_per_s",
            "status",
        ]
    )
    assert stored["cell_id"] == record.cell.id and stored["label"] == record.cell.label and hash(record.cell)
    if stored["pass"] == "forward" and stored["check"]:  # a forward check has never written a gradients key
        assert "gradients" not in stored["check"]


# The oldest form committed (results/evidence/20261125T203402Z-9678da70), samples cut short.
OLDEST = {
    "schema_version": 1,
    "cell_id": "de7ca527161d",
    "implementation": "sdpa",
    "options": {"backend": "flash"},
    "seq_len": 1024,
    "ring_size": None,
    "batch_size": 1,
    "heads": 8,
    "head_dim": 64,
    "dtype": "float16",
    "causal": False,
    "pass": "forward",
    "device": "cuda:0",
    "started_at": "2026-11-25T20:34:02+00:00",
    "duration_s": 0.484,
    "error": None,
    "facts": {},
    "status": "ok",
    "warmup_ms": [0.5],
    "samples_ms": [0.2, 0.3],
    "stats": {
        "n": 2,
        "median_ms": 0.25,
        "mean_ms": 0.25,
        "std_ms": 0.07,
        "q1_ms": 0.225,
        "q3_ms": 0.275,
        "iqr_ms": 0.05,
        "min_ms": 0.2,
        "max_ms": 0.3,
    },
    "memory": {"inputs_mib": 3.0, "peak_allocated_mib": 32.0, "peak_reserved_mib": 68.0},
    "tokens_per_s": 4096000.0,
}


def test_the_oldest_version_1_record_upgrades_with_the_documented_defaults():
    record = Record.from_json(OLDEST)
    assert (record.world_size, record.label) == (1, "sdpa(backend=flash)")
    assert (
        record.check,
        record.flops,
        record.tflops,
        record.projected,
        record.ranks,
        record.comm,
        record.noise,
        record.modes,
        record.plain,
    ) == (None,) * 9
    assert record.memory == Memory(
        inputs_mib=3.0, peak_allocated_mib=32.0, peak_reserved_mib=68.0, held_mib=None, modelled_mib=None
    )
    assert record.stats.rel_iqr == 0.05 / 0.25
    assert record.samples_ms == (0.2, 0.3) and record.median_ms == 0.25 and record.measured
    assert record.to_json()["schema_version"] == 5 and OLDEST["schema_version"] == 1  # the input is left as it was


def test_a_version_2_kernel_fact_named_backend_reads_as_kernel():
    fresh = _fresh("sdpa", options=(("backend", "auto"),)).to_json()
    version_2 = {**fresh, "schema_version": 2, "facts": {"backend": fresh["facts"]["kernel"]}}
    assert Record.from_json(version_2).facts == fresh["facts"] and set(fresh["facts"]) == {"kernel"}
    assert Record.from_json({**version_2, "facts": {"kernel": "flash", "backend": "x"}}).facts["kernel"] == "flash"


def test_a_version_3_record_keeps_its_bytes_per_ring_step_and_has_none_per_call():
    traffic = {"rank": 0, "sent_bytes_per_step": 512.0, "wait_ms": 1.0, "call_ms": 4.0, "wait_share": 0.25}
    comm = {"sent_bytes_per_step": 512.0, "wait_share": 0.25, "ranks": [traffic]}
    version_3 = {**_fresh("sdpa", options=(("backend", "auto"),)).to_json(), "schema_version": 3, "comm": comm}
    record = Record.from_json(version_3)
    assert record.comm == Comm(
        sent_bytes_per_call=None,
        wait_share=0.25,
        ranks=(RankTraffic(0, None, 1.0, 4.0, 0.25, sent_bytes_per_step=512.0),),
        sent_bytes_per_step=512.0,
    )
    assert Record.from_json(record.to_json()) == record


def test_a_middle_aged_version_1_record_upgrades_each_part():
    middle = {
        **OLDEST,
        "world_size": 2,
        "ring_size": 2,
        "flops": 1.0,
        "tflops": 1.0,
        "comm": None,
        "plain": None,
        "noise": {"target": 0.05, "rel_iqr": 0.2, "reached": False},
        "modes": {"cold_l2": True, "cuda_graph": False, "notes": []},
        "check": {
            "reference": "dense",
            "rows_checked": 256,
            "max_abs_error": 0.001,
            "rel_error": 0.002,
            "tolerance": 0.005,
            "passed": True,
            "gradients": {"checked": False, "passed": True, "reason": "seq_len above 8192"},
        },
        "projected": {
            "warmup_ms": [0.5],
            "samples_ms": [0.2, 0.3],
            "stats": OLDEST["stats"],
            "peak_allocated_mib": 1.0,
            "peak_reserved_mib": 2.0,
        },
        "ranks": [{"rank": 0, "median_ms": 0.25, "peak_allocated_mib": 1.0}],
        "memory": {**OLDEST["memory"], "modelled_mib": 30.0},
    }
    record = Record.from_json(middle)
    assert record.modes == Modes(
        cold_l2=True, cuda_graph=False, launch_ms=None, device_ms=None, notes=(), calls_per_sample=1
    )
    assert record.check.seconds is None
    assert record.check.gradients == GradientCheck(
        checked=False,
        heads_checked=None,
        rows_checked=None,
        dq_rel_error=None,
        dk_rel_error=None,
        dv_rel_error=None,
        rel_error=None,
        passed=True,
    )
    projected = record.projected
    assert (projected.modes, projected.held_mib, projected.plain) == (None, None, None)
    assert projected.stats == Stats(
        n=2,
        median_ms=0.25,
        mean_ms=0.25,
        std_ms=0.07,
        q1_ms=0.225,
        q3_ms=0.275,
        iqr_ms=0.05,
        rel_iqr=0.05 / 0.25,
        min_ms=0.2,
        max_ms=0.3,
    )
    assert record.ranks == (RankFigures(rank=0, median_ms=0.25, peak_allocated_mib=1.0, held_mib=None),)
    assert record.memory.modelled_mib == 30.0 and record.memory.held_mib is None
    assert str(record.cell.placement) == "2 processes"


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"schema_version": 6}, "schema version 6, newer than this ringbench reads (5)"),
        ({"schema_version": "1"}, "schema_version: expected a version number, got '1'"),
        ({"seq_len": "1024"}, "seq_len: expected a whole number, got '1024'"),
        ({"causal": 0}, "causal: expected true or false, got 0"),
        ({"samples_ms": [0.2, None]}, "samples_ms[1]: expected a number, got None"),
        ({"memory": {"inputs_mib": 3.0}}, "memory.peak_allocated_mib: missing"),
        ({"stats": None, "status": "finished"}, "status: 'finished' is not a status"),
        ({"colour": "blue"}, "record: unknown field 'colour'"),
    ],
)
def test_a_future_version_or_a_wrong_type_is_refused_with_the_reason(change, reason):
    with pytest.raises(ValueError) as refused:
        Record.from_json({**OLDEST, **change})
    assert str(refused.value) == reason


def test_what_is_not_an_object_is_refused():
    with pytest.raises(ValueError, match=r"^expected a JSON object, got \[1, 2\]$"):
        Record.from_json([1, 2])
    missing = {key: value for key, value in OLDEST.items() if key != "dtype"}
    with pytest.raises(ValueError, match="^dtype: missing$"):
        Record.from_json(missing)
