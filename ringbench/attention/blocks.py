"""Attention on one block with its log-sum-exp, and the float32 merge of partial results.

Ring and dilated attention split one softmax into blocks. A block's output ``o``
and natural-log log-sum-exp ``l`` (per query row) are exactly what two partial
results need to be combined:

    l = logaddexp(l1, l2);  o = o1·exp(l1 − l) + o2·exp(l2 − l)

Blocks come from PyTorch's fused kernels that return the log-sum-exp (flash,
memory-efficient, cuDNN) or, on the CPU and wherever those refuse the inputs,
from a plain PyTorch block computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from ringbench.attention import fused_merge

KERNELS = ("auto", "flash", "efficient", "cudnn", "math")
# Fastest first, as measured on an H100 for bf16 (cuDNN > flash > efficient).
_PREFERENCE = ("cudnn", "flash", "efficient")

Block = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor]"]


def _flash(q, k, v, causal):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
    return out, lse


def _efficient(q, k, v, causal):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
    return out, lse[..., : q.shape[-2]]  # the kernel pads the row count of lse to a multiple of 32


def _cudnn(q, k, v, causal):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    return out, lse.reshape(q.shape[:-1])  # returned as (B, H, S, 1)


def _math(q, k, v, causal):
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        rows, cols = scores.shape[-2:]
        scores.masked_fill_(torch.ones(rows, cols, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(compute)).to(q.dtype), lse.float()


_BLOCKS: dict[str, Block] = {"flash": _flash, "efficient": _efficient, "cudnn": _cudnn, "math": _math}


# Block gradients. A block's share of dq, dk, dv needs the *whole* row's output and
# log-sum-exp (merged over every block), not the block's own: with them, the
# softmax probabilities the fused kernels recompute are the final ones, and the
# row term rowsum(dO ∘ O) is the final one. Dropout is 0, so the random-state
# arguments are placeholders.


def _no_rng(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64, device=device)


def _flash_backward(dout, q, k, v, out, lse, causal):
    rng = _no_rng(q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[-2], k.shape[-2], 0.0, causal, rng, rng
    )[:3]


def _cudnn_backward(dout, q, k, v, out, lse, causal):
    rng = _no_rng(q.device)
    # Row slices of larger tensors go in as they are (checked on an H100 against dense copies);
    # only the log-sum-exp must be in the forward's own layout, (B, H, S, 1).
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse.unsqueeze(-1).contiguous(),
        rng,
        rng,
        None,
        None,
        None,
        q.shape[-2],
        k.shape[-2],
        0.0,
        causal,
    )[:3]


def _math_backward(dout, q, k, v, out, lse, causal):
    compute = torch.promote_types(q.dtype, torch.float32)
    q, k, v, out, dout = (t.to(compute) for t in (q, k, v, out, dout))
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        rows, cols = scores.shape[-2:]
        scores.masked_fill_(torch.ones(rows, cols, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    probs = torch.exp(scores - lse.to(compute).unsqueeze(-1))
    d_scores = probs * (torch.matmul(dout, v.transpose(-2, -1)) - (dout * out).sum(-1, keepdim=True))
    return (
        torch.matmul(d_scores, k) * scale,
        torch.matmul(d_scores.transpose(-2, -1), q) * scale,
        torch.matmul(probs.transpose(-2, -1), dout),
    )


# The memory-efficient kernel's backward is left out: fed a merged log-sum-exp it gave
# gradients far off the reference on an H200, so ring refuses backward passes with it.
BACKWARD_KERNELS = ("auto", "flash", "cudnn", "math")
_BACKWARDS = {"flash": _flash_backward, "cudnn": _cudnn_backward, "math": _math_backward}


# Backward passes across processes go in parts of a few heads, so that what a part fetches or
# sums in float32 is live for one part's heads at a time, not every head's. A part attends at
# least this many query rows (batch × heads × rows), so its kernel still fills the GPU: on 128K
# rows, one head.
BACKWARD_PART_ROWS = 2**17


def backward_part_heads(batch: int, rows: int, heads: int) -> int:
    """Heads per part of a backward pass over ``heads`` heads of ``rows`` query rows each."""
    return min(heads, max(1, -(-BACKWARD_PART_ROWS // (batch * rows))))


@cache
def _works(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a fused kernel accepts inputs like these, tried on a tiny problem."""
    try:
        probe = torch.randn(1, 1, 64, head_dim, device=device, dtype=dtype)
        _BLOCKS[kernel](probe, probe, probe, True)
        return True
    except RuntimeError:
        return False


def choose(kernel: str, q: torch.Tensor, backward: bool = False) -> str:
    """Resolve ``auto`` to the fastest kernel that runs these inputs (with ``backward``, of those with a
    block backward: elsewhere ``efficient`` alone would run, say float32 on a GPU, that is ``math``);
    check an explicit choice."""
    if kernel == "math":
        return kernel
    if q.device.type != "cuda":
        if kernel == "auto":
            return "math"
        raise ValueError(f"kernel '{kernel}' needs a CUDA device (inputs are on {q.device})")
    if kernel == "auto":
        candidates = tuple(c for c in _PREFERENCE if c in _BACKWARDS) if backward else _PREFERENCE
    else:
        candidates = (kernel,)
    for candidate in candidates:
        if _works(candidate, q.device, q.dtype, q.shape[-1]):
            return candidate
    if kernel == "auto":
        return "math"
    raise ValueError(f"kernel '{kernel}' does not run {q.dtype} with head_dim {q.shape[-1]} on {q.device}")


def attend(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """One block: (output in q's dtype, float32 log-sum-exp per query row)."""
    return _BLOCKS[kernel](q, k, v, causal)


def gradient_dtype(kernel: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a block backward of ``kernel`` returns dq, dk, dv in, for inputs of ``dtype``: theirs,
    or at least float32 from the plain PyTorch block, which computes in it."""
    return torch.promote_types(dtype, torch.float32) if kernel == "math" else dtype


def attend_backward(
    kernel: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
):
    """One block's (dq, dk, dv), given the rows' final output ``out`` and log-sum-exp ``lse``.

    A slice of the log-sum-exp is copied to be dense: the fused kernels read it
    with their own row stride.
    """
    return _BACKWARDS[kernel](dout, q, k, v, out, lse.contiguous(), causal)


def _merge(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    new_lse = torch.logaddexp(acc_lse, lse)
    merged = acc.float() * torch.exp(acc_lse - new_lse).unsqueeze(-1)
    merged.addcmul_(out, torch.exp(lse - new_lse).unsqueeze(-1))
    acc.copy_(merged)
    acc_lse.copy_(new_lse)


def merge_path(device: torch.device) -> str:
    """Which merge runs on ``device``: the fused Triton kernel on GPUs where Triton is installed,
    else eager PyTorch. One path per device for the whole sweep, recorded in each cell's facts."""
    return "triton" if device.type == "cuda" and fused_merge.AVAILABLE else "eager"


def merge_(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold a block result into accumulators, in place, computing in float32.

    ``acc``/``acc_lse`` may be views into larger buffers. Rows the accumulator has
    not seen yet carry lse = −inf and take the block's values. ``acc`` is float32, or
    in the block's dtype where it is one block's output that takes one merge (the
    result then rounded once, as a float32 accumulator's cast at the end is).
    """
    (fused_merge.merge_ if merge_path(acc.device) == "triton" else _merge)(acc, acc_lse, out, lse)


class Differentiable(torch.autograd.Function):
    """Autograd around a blocked attention's own forward and backward passes.

    ``apply(q, k, v, computation)``: q, k, v are the tensors gradients are taken
    against; ``computation.forward(keep_lse)`` returns the output and, when asked,
    its rows' merged log-sum-exp, and ``computation.backward(dout, out, lse)`` the
    gradients for q, k, v. The computation may work on copies laid out at setup
    (sharded, or one rank's shard) holding the same values.
    """

    @staticmethod
    def forward(ctx, q, k, v, computation):
        out, lse = computation.forward(keep_lse=any(ctx.needs_input_grad))
        ctx.computation = computation
        if lse is not None:
            ctx.save_for_backward(out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        out, lse = ctx.saved_tensors
        return (*ctx.computation.backward(dout.contiguous(), out, lse), None)
