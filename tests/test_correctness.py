import pytest
import torch
from conftest import measure

from ringbench import Problem, records
from ringbench.attention.impls.dilated import DilatedReference
from ringbench.attention.references import DENSE
from ringbench.run import correctness
from ringbench.sweep.config import TimingBudget
from ringbench.vocabulary import Cell

BUDGET = TimingBudget(warmup_ms=1, rep_ms=2, min_reps=2, max_reps=3)
CPU = torch.device("cpu")


def run(name, seq_len=32, ring_size=None, options=()):
    return measure(Cell(name, options, seq_len, ring_size, 1, 2, 8, "float32", False, "forward"), CPU, BUDGET, 0)


def test_a_wrong_implementation_is_timed_and_marked_wrong():
    record = run("test-wrong")
    assert record.status == records.WRONG
    assert record.check.passed is False and record.check.rel_error > 0.1
    assert record.check.rows_checked == 32 and record.check.tolerance == correctness.TOLERANCE["float32"]
    assert record.stats.n >= 2 and record.samples_ms


def test_nan_output_is_wrong_and_stored_as_null():
    record = run("test-nan")
    assert record.status == records.WRONG
    assert record.check.rel_error is None and record.check.max_abs_error is None


def test_correct_implementations_pass_with_small_recorded_errors():
    record = run("ring", ring_size=4, options=(("kernel", "auto"), ("transfers", "nccl"), ("zigzag", True)))
    assert record.status == records.OK and record.check.rel_error < 1e-6
    assert record.projected.stats.n >= 2
    assert record.flops == 4 * 2 * 32 * 32 * 8


def test_long_sequences_are_checked_on_a_fixed_row_subset(monkeypatch):
    monkeypatch.setattr(correctness, "FULL_CHECK_MAX_SEQ", 16)
    monkeypatch.setattr(correctness, "SUBSET_ROWS", 5)
    rows = correctness.check_rows(64, seed=3, device=CPU)
    assert len(rows) == 5 and torch.equal(rows, correctness.check_rows(64, seed=3, device=CPU))
    assert torch.equal(rows, rows.sort().values) and not torch.equal(
        rows, correctness.check_rows(64, seed=4, device=CPU)
    )
    wrong = run("test-wrong", seq_len=64)
    assert wrong.check.rows_checked == 5 and wrong.status == records.WRONG
    right = run("sdpa", seq_len=64, options=(("backend", "auto"),))
    assert right.check.rows_checked == 5 and right.status == records.OK


def _problem(seq_len, causal, family_options=None, dtype=torch.float64):
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, seq_len, 8, generator=generator, dtype=dtype) for _ in range(3))
    dout = torch.randn(2, 3, seq_len, 8, generator=generator, dtype=dtype)
    return Problem.of(q, k, v, dout=dout, causal=causal, ring_size=None, options=family_options or {})


@pytest.mark.parametrize(
    "reference, options", [(DENSE, None), (DilatedReference(), {"segment_lengths": (8, 16), "dilation_rates": (1, 4)})]
)
@pytest.mark.parametrize("causal", [False, True])
def test_streamed_reference_gradients_equal_float64_autograd(monkeypatch, reference, options, causal):
    monkeypatch.setattr(correctness, "QUERY_BLOCK", 5)  # blocks of 5 rows, the last one short
    monkeypatch.setattr(correctness, "KEY_BLOCK", 7)
    p = _problem(32, causal, options)
    q, k, v = (t[1, 2].clone().requires_grad_() for t in (p.q, p.k, p.v))
    rows = torch.arange(32)
    bias = correctness._biased(torch.zeros(32, 32, dtype=torch.float64), reference, p, rows, rows, 2)
    seen = torch.isfinite(bias).any(-1, keepdim=True)
    out = torch.softmax(q @ k.T / 8**0.5 + bias.masked_fill(~seen, 0.0), -1) @ v * seen
    expected = torch.autograd.grad(out, (q, k, v), p.inputs.everything("dout")[1, 2])
    q_rows, k_rows = torch.tensor([0, 4, 5, 31]), torch.tensor([1, 2, 30])
    got = correctness.reference_gradients(reference, p, 1, 2, q_rows, k_rows)
    for value, wanted, sampled in zip(got, expected, (q_rows, k_rows, k_rows)):
        torch.testing.assert_close(value, wanted[sampled], rtol=1e-12, atol=1e-12)


def test_the_gradient_sample_is_whole_up_to_the_limit_then_seeded(monkeypatch):
    whole = correctness.GradientSample.of((2, 3, 16, 4), CPU, seed=0)
    assert len(whole.pairs) == 6 and torch.equal(whole.q_rows, torch.arange(16))
    monkeypatch.setattr(correctness, "GRADIENT_FULL_MAX_SEQ", 8)
    monkeypatch.setattr(correctness, "GRADIENT_SAMPLE_ROWS", 4)
    sample = correctness.GradientSample.of((2, 3, 16, 4), CPU, seed=0)
    assert sample.pairs == ((0, 0), (1, 2)) and len(sample.q_rows) == len(sample.k_rows) == 4
    again = correctness.GradientSample.of((2, 3, 16, 4), CPU, seed=0)
    assert torch.equal(sample.q_rows, again.q_rows) and torch.equal(sample.k_rows, again.k_rows)


def test_tolerance_follows_what_an_implementation_accumulates_in():
    assert correctness.tolerance("float64", None) == correctness.TOLERANCE["float64"]
    assert correctness.tolerance("float64", "float32") == correctness.TOLERANCE["float32"]
    assert correctness.tolerance("bfloat16", "float32") == correctness.TOLERANCE["bfloat16"]


def test_a_float64_sweep_passes_float32_accumulating_implementations_and_still_catches_wrong_ones():
    def cell(name, options=(), ring_size=None, pass_name="forward"):
        return Cell(name, options, 32, ring_size, 1, 2, 8, "float64", False, pass_name)

    ring = measure(
        cell("ring", (("kernel", "auto"), ("transfers", "nccl"), ("zigzag", False)), 4, "forward+backward"),
        CPU,
        BUDGET,
        0,
    )
    assert ring.status == records.OK and ring.check.tolerance == correctness.TOLERANCE["float32"]
    assert 1e-10 < ring.check.rel_error < 1e-6  # beyond float64's tolerance, well within float32's
    dilated = measure(
        cell("dilated", (("dilation_rates", (1, 2)), ("kernel", "auto"), ("segment_lengths", (8, 16)))), CPU, BUDGET, 0
    )
    assert dilated.status == records.OK
    wrong = measure(cell("test-wrong"), CPU, BUDGET, 0)
    assert wrong.status == records.WRONG and wrong.check.tolerance == correctness.TOLERANCE["float64"]
