from pathlib import Path

import torch

from ringbench import correctness, records, registry, worker
from ringbench.config import TimingBudget
from ringbench.plan import Cell

BUDGET = TimingBudget(warmup_ms=1, rep_ms=2, min_reps=2, max_reps=3)
CPU = torch.device("cpu")


def run(name, seq_len=32, ring_size=None, options=()):
    registry.load_plugins(("fake_impls",), Path(__file__).parent / "plugins")
    return worker.run_cell(Cell(name, options, seq_len, ring_size, 1, 2, 8, "float32", False, "forward"), CPU, BUDGET, 0)


def test_a_wrong_implementation_is_timed_and_marked_wrong():
    record = run("test-wrong")
    assert record["status"] == records.WRONG
    assert record["check"]["passed"] is False and record["check"]["rel_error"] > 0.1
    assert record["check"]["rows_checked"] == 32 and record["check"]["tolerance"] == correctness.TOLERANCE["float32"]
    assert record["stats"]["n"] >= 2 and record["samples_ms"]


def test_nan_output_is_wrong_and_stored_as_null():
    record = run("test-nan")
    assert record["status"] == records.WRONG
    assert record["check"]["rel_error"] is None and record["check"]["max_abs_error"] is None


def test_correct_implementations_pass_with_small_recorded_errors():
    record = run("ring", ring_size=4, options=(("kernel", "auto"), ("zigzag", True)))
    assert record["status"] == records.OK and record["check"]["rel_error"] < 1e-6
    assert record["projected"]["stats"]["n"] >= 2
    assert record["flops"] == 4 * 2 * 32 * 32 * 8


def test_long_sequences_are_checked_on_a_fixed_row_subset(monkeypatch):
    monkeypatch.setattr(correctness, "FULL_CHECK_MAX_SEQ", 16)
    monkeypatch.setattr(correctness, "SUBSET_ROWS", 5)
    rows = correctness.check_rows(64, seed=3, device=CPU)
    assert len(rows) == 5 and torch.equal(rows, correctness.check_rows(64, seed=3, device=CPU))
    assert torch.equal(rows, rows.sort().values) and not torch.equal(rows, correctness.check_rows(64, seed=4, device=CPU))
    wrong = run("test-wrong", seq_len=64)
    assert wrong["check"]["rows_checked"] == 5 and wrong["status"] == records.WRONG
    right = run("sdpa", seq_len=64, options=(("backend", "auto"),))
    assert right["check"]["rows_checked"] == 5 and right["status"] == records.OK
