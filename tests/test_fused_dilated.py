"""The fused dilated kernel, run by Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET),
against the float64 reference; and how the dilated implementations choose it."""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from ringbench import Problem  # noqa: E402
from ringbench.attention.impls.dilated import DilatedReference, _OneDevice  # noqa: E402
from ringbench.attention.registry import Registry  # noqa: E402
from ringbench.run import correctness  # noqa: E402
from ringbench.vocabulary import Cell  # noqa: E402

BUNDLED = Registry.bundled()

# (seq_len, ring size, segment lengths, dilation rates): spanning and local patterns, parts of
# 12 rows (a partly filled tile), no r = 1 pattern (accumulators initialised, some rows unkept).
CASES = [
    (96, 2, (96, 48, 96), (1, 3, 2)),
    (64, 4, (64, 32), (1, 2)),
    (96, 4, (96,), (2,)),
    (144, 3, (48, 144), (2, 3)),
]


def _problem(seq_len, ring_size, lengths, rates, causal, dtype):
    generator = torch.Generator().manual_seed(seq_len + ring_size)
    q, k, v = (torch.randn(2, 3, seq_len, 16, generator=generator).to(dtype) for _ in range(3))
    options = {"segment_lengths": lengths, "dilation_rates": rates, "kernel": "fused"}
    return Problem.of(q, k, v, causal=causal, ring_size=ring_size, options=options)


@pytest.mark.parametrize("seq_len, ring_size, lengths, rates", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_fused_steps_match_the_float64_reference(seq_len, ring_size, lengths, rates, causal):
    # float16 only: the interpreter misreads bfloat16 (bfloat16 cells are checked on a GPU, configs/gpu-checks.yaml).
    dtype = torch.float16
    problem = _problem(seq_len, ring_size, lengths, rates, causal, dtype)
    out, lse = _OneDevice(problem, "fused", None, seq_len // ring_size).forward(keep_lse=True)
    reference = correctness.reference_rows(DilatedReference(), problem, torch.arange(seq_len))
    assert out.dtype == dtype
    assert (out.double() - reference).abs().max() <= 2e-3 * reference.abs().max()
    # The log-sum-exp the backward pass reads is the library path's, computed in float32 on the same rows.
    library = _OneDevice(
        _problem(seq_len, ring_size, lengths, rates, causal, dtype), "math", None, seq_len // ring_size
    ).forward(keep_lse=True)[1]
    torch.testing.assert_close(lse, library, rtol=0, atol=1e-5)


def test_rows_no_pattern_keeps_are_zero_with_an_empty_log_sum_exp():
    problem = _problem(96, 4, (96,), (2,), False, torch.float16)
    out, lse = _OneDevice(problem, "fused", None, 24).forward(keep_lse=True)
    # r = 2: head 0 keeps the even rows only, head 1 the odd ones.
    assert torch.equal(out[:, 0, 1::2], torch.zeros_like(out[:, 0, 1::2]))
    assert torch.equal(lse[:, 1, 0::2], torch.full_like(lse[:, 1, 0::2], float("-inf")))
    assert out[:, 0, 0::2].abs().min() > 0


def _cell(kernel, dtype="float16", head_dim=16, world_size=1, pass_name="forward"):
    options = (("dilation_rates", (1, 2)), ("kernel", kernel), ("segment_lengths", (32, 64)))
    return Cell("ring-dilated", options, 64, world_size, 1, 2, head_dim, dtype, False, pass_name, world_size)


def test_cells_the_fused_kernel_cannot_run_are_left_out_with_the_reason():
    excludes = BUNDLED.get("ring-dilated").excludes
    assert excludes(_cell("fused")) is None
    assert excludes(_cell("fused", pass_name="forward+backward")) is None  # its backward runs on library blocks
    assert (
        excludes(_cell("fused", dtype="float32"))
        == "the fused kernel takes float16 or bfloat16 with head_dim in 16, 32, 64, 128"
    )
    assert (
        excludes(_cell("fused", head_dim=80))
        == "the fused kernel takes float16 or bfloat16 with head_dim in 16, 32, 64, 128"
    )
    assert (
        excludes(_cell("fused", world_size=2))
        == "the fused kernel runs on one device; across processes blocks come from the library kernels"
    )
    assert excludes(_cell("auto", dtype="float32", world_size=2)) is None


def test_on_the_cpu_auto_takes_library_blocks_and_fused_is_refused():
    problem = _problem(64, 2, (64, 32), (1, 2), False, torch.float16)
    BUNDLED.get("ring-dilated").setup(
        replace(problem, options={**problem.options, "kernel": "auto"}, facts=(facts := {}))
    )
    assert facts == {"kernel": "math", "merge": "eager"}
    with pytest.raises(ValueError, match="kernel 'fused' needs Triton and a CUDA device \\(inputs are on cpu\\)"):
        BUNDLED.get("ring-dilated").setup(problem)


def test_the_memory_model_follows_the_kernel_that_ran():
    model = BUNDLED.get("ring-dilated").memory_model
    rows, element = 2 * 64, 2  # batch 1 × 2 heads × 64 tokens, float16
    resident = rows * (16 * 4 + 4)  # the float32 accumulator and its log-sum-exp
    assert model(_cell("fused"), {"kernel": "fused"}) == resident + rows * 16 * element
    # Library blocks also hold a pattern's gathered rows: for r = 2, half the rows of q, k, v and
    # the accumulator, with the block's output and log-sum-exp.
    gathered = rows // 2 * (16 * (3 * element + 4) + 4) + rows // 2 * (16 * element + 4)
    assert model(_cell("auto"), {"kernel": "cudnn"}) == resident + gathered
