"""One ring step of one dilated pattern, attention and merge in a single Triton kernel.

On one device, a ring step of a pattern (w, r) split into ``parts`` shards meets,
for every segment, query part i with K/V part (i − step) mod parts (see
``dilated.step_runs``). Done with the library kernels, each step takes gathers of
the sparse rows, one or two attention calls and a merge, and a LongNet sweep runs
several patterns: at short sequences the launches, not the arithmetic, set the
time. This kernel reads the sparse rows of q, k and v where they lie (row
seg·w + (h mod r) + r·j of the natural layout), computes every block of the step
with an online softmax, and merges each block into the float32 accumulator and its
log-sum-exp in place: one launch per pattern and step, no copies.

Block sizes follow the part length only, so a shape always runs the same compiled
kernel: there is no autotuning state for a sweep to change.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the library kernels serve
    triton = None

DTYPES = (torch.float16, torch.bfloat16)  # what tl.dot takes at full precision with float32 accumulation
HEAD_DIMS = (16, 32, 64, 128)


def runs_on(q: torch.Tensor) -> bool:
    """Whether the kernel takes inputs like ``q``: a CUDA tensor in half precision, a power-of-two head_dim."""
    return triton is not None and q.device.type == "cuda" and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS


if triton is not None:
    # Over 60 lines: a Triton kernel is one function, compiled whole; its parts could not be calls.
    @triton.jit
    def _step_kernel(
        q,
        k,
        v,
        acc,
        acc_lse,
        heads,
        segments,
        w,
        r,
        parts,
        n,
        step,
        scale_log2,
        q0,
        q1,
        q2,
        q3,
        k0,
        k1,
        k2,
        k3,
        v0,
        v1,
        v2,
        v3,
        a0,
        a1,
        a2,
        a3,
        l0,
        l1,
        l2,
        CAUSAL: tl.constexpr,
        DIAGONAL: tl.constexpr,
        FRESH: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        block = tl.program_id(0)  # ((b·heads + h)·segments + segment)·parts + query part
        part = block % parts
        segment = (block // parts) % segments
        h = ((block // (parts * segments)) % heads).to(tl.int64)
        b = (block // (parts * segments * heads)).to(tl.int64)
        if CAUSAL and part < step:
            return  # the K/V part wrapped round to a later one: above the diagonal
        kv_part = (part - step + parts) % parts
        first = (segment * w + h % r).to(tl.int64)  # natural row of the segment's sparse row 0

        local = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows within the part
        live = local < n
        rows = first + r * (part * n + local)
        column = tl.arange(0, HEAD_DIM)
        query = tl.load(q + b * q0 + h * q1 + rows[:, None] * q2 + column[None, :] * q3, mask=live[:, None], other=0.0)

        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        out = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        end = (tl.program_id(1) + 1) * BLOCK_M if DIAGONAL else n  # on the diagonal, keys up to the last query
        for start in range(0, end, BLOCK_N):
            key_local = start + tl.arange(0, BLOCK_N)
            key_live = key_local < n
            key_rows = first + r * (kv_part * n + key_local)
            keys = tl.load(
                k + b * k0 + h * k1 + key_rows[:, None] * k2 + column[None, :] * k3, mask=key_live[:, None], other=0.0
            )
            scores = tl.dot(query, tl.trans(keys)) * scale_log2
            seen = key_live[None, :]
            if DIAGONAL:
                seen = seen & (key_local[None, :] <= local[:, None])
            scores = tl.where(seen, scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            weights = tl.exp2(scores - new_top[:, None])
            rescale = tl.exp2(top - new_top)
            total = total * rescale + tl.sum(weights, 1)
            values = tl.load(
                v + b * v0 + h * v1 + key_rows[:, None] * v2 + column[None, :] * v3, mask=key_live[:, None], other=0.0
            )
            out = out * rescale[:, None] + tl.dot(weights.to(values.dtype), values)
            top = new_top

        # Every live row saw at least one key (on the diagonal, itself), so total > 0.
        block_lse = (top + tl.log2(total)) * 0.6931471805599453
        lse_at = acc_lse + b * l0 + h * l1 + rows * l2
        acc_at = acc + b * a0 + h * a1 + rows[:, None] * a2 + column[None, :] * a3
        if FRESH:  # the first block of every row: the accumulators hold nothing yet
            tl.store(acc_at, out / total[:, None], mask=live[:, None])
            tl.store(lse_at, block_lse, mask=live)
        else:
            old_lse = tl.load(lse_at, mask=live, other=0.0)
            merged_top = tl.maximum(old_lse, block_lse)
            old_weight, new_weight = tl.exp(old_lse - merged_top), tl.exp(block_lse - merged_top)
            weight_sum = old_weight + new_weight
            merged = (
                tl.load(acc_at, mask=live[:, None], other=0.0) * (old_weight / weight_sum)[:, None]
                + out * (new_weight / (weight_sum * total))[:, None]
            )
            merged_lse = merged_top + tl.log(weight_sum)
            tl.debug_barrier()  # in place: every warp has read the accumulators before any writes (fused_merge)
            tl.store(acc_at, merged, mask=live[:, None])
            tl.store(lse_at, merged_lse, mask=live)


def _tile(n: int) -> int:
    """Query rows of a program, and key rows of an iteration, for parts of ``n`` rows: 64 (one warp
    group's worth) measured fastest on an H200 at 1K-8K tokens, against 32 and 128 and mixes."""
    return min(64, max(16, triton.next_power_of_2(n)))


def _step(q, k, v, acc, acc_lse, w, r, parts, step, causal, fresh):
    batch, heads, seq_len, head_dim = q.shape
    n = w // r // parts
    tile = _tile(n)
    grid = (batch * heads * (seq_len // w) * parts, triton.cdiv(n, tile))
    _step_kernel[grid](
        q,
        k,
        v,
        acc,
        acc_lse,
        heads,
        seq_len // w,
        w,
        r,
        parts,
        n,
        step,
        head_dim**-0.5 * 1.4426950408889634,  # scores in base 2: exp2 is the fast path
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *acc.stride(),
        *acc_lse.stride(),
        CAUSAL=causal,
        DIAGONAL=causal and step == 0,
        FRESH=fresh,
        BLOCK_M=tile,
        BLOCK_N=tile,
        HEAD_DIM=head_dim,
        num_warps=4,
        num_stages=3,
    )


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patterns: list[tuple[int, int, int]], causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 output and log-sum-exp of dilated attention over ``patterns`` (w, r, parts),
    each pattern's segments split into ``parts`` shards and taken a ring step at a time.

    Step 0 of a pattern with r = 1 reaches every row (each query part meets its own K/V
    part), so when there is one it goes first and writes the accumulators instead of
    merging into them, and they need no initialising. Rows no pattern keeps get
    zeros and lse = −inf.
    """
    ordered = sorted(patterns, key=lambda pattern: pattern[1] != 1)  # stable: else the configured order
    fresh = ordered[0][1] == 1
    shape = q.shape
    if fresh:
        acc, acc_lse = (torch.empty(s, dtype=torch.float32, device=q.device) for s in (shape, shape[:-1]))
    else:
        acc = torch.zeros(shape, dtype=torch.float32, device=q.device)
        acc_lse = torch.full(shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for index, (w, r, parts) in enumerate(ordered):
        for step in range(parts):
            _step(q, k, v, acc, acc_lse, w, r, parts, step, causal, fresh and index == 0 and step == 0)
    return acc, acc_lse
