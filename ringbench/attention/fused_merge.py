"""The log-sum-exp merge as one Triton kernel: one pass over the float32 accumulator.

Eager PyTorch merges in about eight kernels and two read-write passes over the
accumulator; this kernel reads the accumulator and the block once and writes the
accumulator once. It is one fixed kernel for every shape and stride (Triton
compiles it once per dtype and head_dim), so no cache, recompile limit or guard
can make a later cell run other code than an earlier one; ``torch.compile`` could.

Tensors are 4-D (or 3-D for log-sum-exps) views with any strides: the ring and
dilated code hand in slices of larger buffers.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager merge serves
    triton = None

AVAILABLE = triton is not None
ROWS_PER_PROGRAM = 16


if AVAILABLE:

    @triton.jit
    def _merge_kernel(
        acc,
        acc_lse,
        out,
        lse,
        rows,
        dim1,
        dim2,
        head_dim,
        a0,
        a1,
        a2,
        a3,
        al0,
        al1,
        al2,
        o0,
        o1,
        o2,
        o3,
        ol0,
        ol1,
        ol2,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        live = row < rows
        i2 = row % dim2  # row → (i0, i1, i2) of the (dim0, dim1, dim2) leading shape
        i1 = (row // dim2) % dim1
        i0 = row // (dim2 * dim1)
        column = tl.arange(0, BLOCK_D)
        cell = live[:, None] & (column < head_dim)[None, :]

        old_lse = tl.load(acc_lse + i0 * al0 + i1 * al1 + i2 * al2, mask=live, other=float("-inf"))
        new_lse = tl.load(lse + i0 * ol0 + i1 * ol1 + i2 * ol2, mask=live, other=float("-inf"))
        top = tl.maximum(old_lse, new_lse)
        top = tl.where(top == float("-inf"), 0.0, top)  # rows no block has reached yet stay at −inf
        old_weight, new_weight = tl.exp(old_lse - top), tl.exp(new_lse - top)
        total = old_weight + new_weight
        merged_lse = top + tl.log(total)
        old_weight = tl.where(total > 0, old_weight / total, 0.0)
        new_weight = tl.where(total > 0, new_weight / total, 0.0)

        acc_at = acc + (i0 * a0 + i1 * a1 + i2 * a2)[:, None] + column[None, :] * a3
        out_at = out + (i0 * o0 + i1 * o1 + i2 * o2)[:, None] + column[None, :] * o3
        merged = (
            tl.load(acc_at, mask=cell, other=0.0) * old_weight[:, None]
            + tl.load(out_at, mask=cell, other=0.0).to(tl.float32) * new_weight[:, None]
        )
        # The merge is in place, and Triton may give a row's log-sum-exp to threads of other warps
        # to load than the one that stores it: no warp writes before every warp has read.
        tl.debug_barrier()
        tl.store(acc_at, merged.to(acc.dtype.element_ty), mask=cell)
        tl.store(acc_lse + i0 * al0 + i1 * al1 + i2 * al2, merged_lse, mask=live)


def _four_d(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading dimensions padded with ones to ``rank`` (views)."""
    while t.dim() < rank:
        t = t.unsqueeze(0)
    return t


def merge_(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """acc, acc_lse ← the log-sum-exp merge of themselves with a block's ``out``, ``lse``, in place.

    acc, out: (…, rows, D) in any float dtype, the merge computed in float32 and rounded to acc's;
    the lse's: float32 (…, rows); at most three leading dimensions.
    """
    acc, out = _four_d(acc, 4), _four_d(out, 4)
    acc_lse, lse = _four_d(acc_lse, 3), _four_d(lse, 3)
    dim0, dim1, dim2, head_dim = acc.shape
    rows = dim0 * dim1 * dim2
    if rows == 0:
        return
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _merge_kernel[grid](
        acc,
        acc_lse,
        out,
        lse,
        rows,
        dim1,
        dim2,
        head_dim,
        *acc.stride(),
        *acc_lse.stride(),
        *out.stride(),
        *lse.stride(),
        BLOCK_ROWS=ROWS_PER_PROGRAM,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
