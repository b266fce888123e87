"""The Triton merge, run by Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET), against
the log-sum-exp merge in float64, on strided views as the ring hands it; into a float32
accumulator and, in place, into a block's own float16 output."""

import pytest
import torch

pytest.importorskip("triton")

from ringbench.attention import fused_merge  # noqa: E402


def _merged_in_float64(acc, acc_lse, out, lse):
    acc, acc_lse, out, lse = (t.double() for t in (acc, acc_lse, out, lse))
    new_lse = torch.logaddexp(acc_lse, lse)
    return acc * torch.exp(acc_lse - new_lse)[..., None] + out * torch.exp(lse - new_lse)[..., None], new_lse


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float16])
def test_merge_into_strided_views_matches_float64(acc_dtype):
    generator = torch.Generator().manual_seed(0)
    # Every other head of a larger buffer, and every other row: views, as the ring's slices are.
    whole = torch.randn(2, 6, 40, 32, generator=generator).to(acc_dtype)
    whole_lse = torch.randn(2, 6, 40, generator=generator)
    acc, acc_lse = whole[:, ::2, ::2], whole_lse[:, ::2, ::2]
    acc_lse[:, :, 0] = float("-inf")  # rows no block has reached yet take the new block's values
    out = torch.randn(2, 3, 20, 32, generator=generator).to(torch.float16)
    lse = torch.randn(2, 3, 20, generator=generator)
    expected, expected_lse = _merged_in_float64(acc, acc_lse, out, lse)
    untouched = whole[:, 1::2].clone()

    fused_merge.merge_(acc, acc_lse, out, lse)

    tolerance = 1e-6 if acc_dtype == torch.float32 else 1e-3  # float16: the result rounded once
    assert (acc.double() - expected).abs().max() <= tolerance * expected.abs().max()
    assert (acc_lse.double() - expected_lse).abs().max() <= 1e-6 * expected_lse.abs().max()
    assert torch.equal(whole[:, 1::2], untouched)  # heads outside the view are not written
