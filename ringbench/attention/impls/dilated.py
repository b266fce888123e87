"""Dilated attention (LongNet, Ding et al. 2023), on one device and ring-sharded.

A pattern (w, r) cuts the sequence into segments of length w and, within each,
keeps every r-th position starting at offset (head index mod r); attention is dense
inside each sparse segment, and rows a pattern does not select get nothing from it.
Several patterns are mixed with weights proportional to each one's softmax
denominator, which is exactly a log-sum-exp merge of their outputs.

Segment-length rule: a segment longer than the sequence is clipped to the sequence
(LongNet's convention); otherwise seq_len must be a multiple of w, and cells where
it is not are left out of the plan with the reason.

``ring-dilated`` shards the sequence into ``ring_size`` shards. A pattern whose
segment fits in a shard is computed locally by every rank; a larger segment spans
g = w / shard_len shards, and its ranks exchange only the sparse rows the pattern
selects, ring-fashion, the diagonal block causal and later shards skipped when causal.
On one device the ranks are simulated; across processes (world size > 1) each
process holds one contiguous shard and the sparse rows travel by point-to-point ops.

Blocks come from PyTorch's fused kernels on gathered sparse rows (``ringbench.attention.blocks``)
or, on one device in half precision, from ``ringbench.attention.fused_dilated``: one Triton
kernel per pattern and ring step that reads the sparse rows in place and merges as
it goes. The backward pass always runs on the library kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from ringbench.attention import blocks, fused_dilated
from ringbench.attention.comm import TravellingSums
from ringbench.attention.models import forward_only
from ringbench.attention.references import Reference
from ringbench.attention.registry import Bench, Option, Problem, register
from ringbench.vocabulary import DTYPE_BYTES, PASSES, Cell

OPTIONS = {
    "segment_lengths": Option((2048, 4096), help="segment length w of each pattern", short="w"),
    "dilation_rates": Option((1, 2), help="dilation rate r of each pattern", short="r"),
    "kernel": Option(
        "auto",
        choices=("auto", "fused", *blocks.KERNELS[1:]),
        help="forward blocks: fused (one Triton kernel per pattern and ring step; one device, "
        "half precision) or a library kernel; auto picks fused where it runs, else the fastest",
    ),
}


def patterns(options: Mapping[str, Any], seq_len: int) -> list[tuple[int, int]]:
    """Effective (w, r) pairs for a sequence: segments longer than it are clipped to it."""
    return [(min(w, seq_len), r) for w, r in zip(options["segment_lengths"], options["dilation_rates"])]


class DilatedReference(Reference):
    """Dense attention with log(number of patterns covering (q, k)) added to each score, and −inf
    where no pattern covers the pair: what merging the patterns' softmaxes by their sums computes."""

    name = "dilated"

    def bias(self, problem: Problem, rows: torch.Tensor, keys: torch.Tensor, head: int) -> torch.Tensor:
        count = torch.zeros(len(rows), len(keys), dtype=torch.float64, device=rows.device)
        for w, r in patterns(problem.options, problem.seq_len):
            offset = head % r
            same_segment = (rows // w).unsqueeze(1) == (keys // w).unsqueeze(0)
            row_kept = ((rows % w) % r == offset).unsqueeze(1)
            key_kept = ((keys % w) % r == offset).unsqueeze(0)
            count += (same_segment & row_kept & key_kept).double()
        return count.log()


def _check_options(options: Mapping[str, Any]) -> str | None:
    lengths, rates = options["segment_lengths"], options["dilation_rates"]
    if len(lengths) != len(rates):
        return f"segment_lengths and dilation_rates differ in length ({len(lengths)} and {len(rates)})"
    for w, r in zip(lengths, rates):
        if w % r:
            return f"segment length {w} is not divisible by its dilation rate {r}"
    if len(set(zip(lengths, rates))) != len(lengths):
        return "a pattern (segment length, dilation rate) is repeated"
    return None


def _excludes(cell: Cell) -> str | None:
    options = dict(cell.options)
    if options["kernel"] == "fused":
        if cell.world_size > 1:
            return "the fused kernel runs on one device; across processes blocks come from the library kernels"
        if cell.dtype not in ("float16", "bfloat16") or cell.head_dim not in fused_dilated.HEAD_DIMS:
            return (
                f"the fused kernel takes float16 or bfloat16 with head_dim in "
                f"{', '.join(map(str, fused_dilated.HEAD_DIMS))}"
            )
    elif cell.pass_name != "forward" and options["kernel"] not in blocks.BACKWARD_KERNELS:
        return f"the backward runs on {', '.join(blocks.BACKWARD_KERNELS[1:])} blocks, not {options['kernel']}"
    for w, r in patterns(options, cell.seq_len):
        if cell.seq_len % w:
            return f"seq_len {cell.seq_len} is not divisible by segment length {w}"
        if w % r:
            return f"segment clipped to seq_len {w} is not divisible by dilation rate {r}"
        if cell.ring_size is not None:
            shard_len = cell.seq_len // cell.ring_size
            if w <= shard_len and shard_len % w:
                return f"shard length {shard_len} is not a multiple of segment length {w}"
            if w > shard_len and (w % shard_len or shard_len % r):
                return f"segment length {w} does not span whole shards of {shard_len} with dilation {r}"
    return None


def _flops(cell: Cell) -> float:
    """Only computed blocks count: per pattern, dense attention within each sparse segment."""
    total = 0.0
    for w, r in patterns(dict(cell.options), cell.seq_len):
        sparse_len = w // r
        total += 4 * cell.batch_size * cell.heads * (cell.seq_len // w) * sparse_len**2 * cell.head_dim
    return total / 2 if cell.causal else total


def _memory_model(cell: Cell, facts: Mapping[str, Any]) -> int:
    """Bytes beyond the inputs at the peak.

    The float32 accumulator and its log-sum-exp live throughout. On top of them
    comes, at the end, the output in the input dtype. The fused kernel needs
    nothing else; with library kernels, while a pattern runs, its transients come
    on top instead: the block output and its log-sum-exp and, when r > 1, the
    gathered sparse q, k, v and the gathered float32 accumulator rows.
    """
    rows = cell.batch_size * cell.heads * cell.seq_len
    element = DTYPE_BYTES[cell.dtype]
    resident = rows * (cell.head_dim * 4 + 4)
    on_top = rows * cell.head_dim * element  # the final output
    if facts.get("kernel") == "fused":
        return resident + on_top
    for _, r in patterns(dict(cell.options), cell.seq_len):
        sparse_rows = rows // r
        block = sparse_rows * (cell.head_dim * element + 4)
        gathered = 0 if r == 1 else sparse_rows * (cell.head_dim * (3 * element + 4) + 4)
        on_top = max(on_top, block + gathered)
    return resident + on_top


def _offsets_index(heads: int, w: int, r: int, device: torch.device) -> torch.Tensor:
    """Positions kept within a segment, per head: (h mod r) + r·j for j < w/r."""
    return (torch.arange(heads, device=device) % r).unsqueeze(1) + r * torch.arange(w // r, device=device)


def _segments(x: torch.Tensor, w: int, r: int, index: torch.Tensor) -> torch.Tensor:
    """(B, H, S, …) → (B, H, S/w, w/r, …): the rows a pattern keeps, grouped by segment."""
    b, h, s = x.shape[:3]
    tail = x.shape[3:]
    grouped = x.view(b, h, s // w, w, *tail)
    if r == 1:
        return grouped
    gather_index = index.view(1, h, 1, w // r, *(1 for _ in tail)).expand(b, h, s // w, w // r, *tail)
    return grouped.gather(3, gather_index)


def _scatter_back(target: torch.Tensor, w: int, r: int, index: torch.Tensor, values: torch.Tensor) -> None:
    if r == 1:
        return  # values was a view of target and has been updated in place
    b, h, s = target.shape[:3]
    tail = target.shape[3:]
    scatter_index = index.view(1, h, 1, w // r, *(1 for _ in tail)).expand(values.shape)
    target.view(b, h, s // w, w, *tail).scatter_(3, scatter_index, values)


def step_runs(parts: int, step: int, causal: bool) -> list[tuple[int, int, int, bool]]:
    """Ring step ``step`` of a segment split into ``parts`` shards, every rank at once, as
    (first query part, first K/V part, count, causal) runs: part i meets K/V part (i − step) mod parts,
    so the step is at most two runs in which both parts advance by one, each one batched kernel call.
    When causal, step 0 is the diagonal and the wrapped run lies wholly above it."""
    if step == 0:
        return [(0, 0, parts, causal)]
    runs = [(step, 0, parts - step, False)]
    return runs if causal else runs + [(0, parts - step, step, False)]


def _by_part(t: torch.Tensor, parts: int) -> torch.Tensor:
    """(B, H, G, w/r, …) → (B·H·G, parts, w/r/parts, …), a view: segments batched, their
    parts in the place of heads, so a run of parts is one slice."""
    b, h, g, length = t.shape[:4]
    return t.view(b * h * g, parts, length // parts, *t.shape[4:])


def _pattern(q, k, v, acc, acc_lse, w, r, parts, causal, kernel):
    """Fold one pattern into the accumulators; its segments split into ``parts`` shards, a
    ring step of every shard of every segment at once."""
    index = _offsets_index(q.shape[1], w, r, q.device)
    acc_rows, lse_rows = _segments(acc, w, r, index), _segments(acc_lse, w, r, index)
    qs, ks, vs = (_by_part(_segments(t, w, r, index), parts) for t in (q, k, v))
    accs, lses = _by_part(acc_rows, parts), _by_part(lse_rows, parts)
    for step in range(parts):
        for q0, kv0, count, block_causal in step_runs(parts, step, causal):
            queries, keys = slice(q0, q0 + count), slice(kv0, kv0 + count)
            out, lse = blocks.attend(kernel, qs[:, queries], ks[:, keys], vs[:, keys], block_causal)
            blocks.merge_(accs[:, queries], lses[:, queries], out, lse)
            del out, lse
    _scatter_back(acc, w, r, index, acc_rows)
    _scatter_back(acc_lse, w, r, index, lse_rows)


def _pattern_backward(tensors, grads, w, r, parts, causal, kernel):
    """Add one pattern's share of dq, dk, dv to the float32 ``grads``, a ring step at a time.

    ``tensors`` are q, k, v, the gradient of the output, the output and its merged
    log-sum-exp: with the merged rows, each block's fused backward gives exactly
    that block's share. Within a run every K/V part appears once, so shares add
    without collisions.
    """
    q = tensors[0]
    index = _offsets_index(q.shape[1], w, r, q.device)
    grad_rows = [_segments(t, w, r, index) for t in grads]
    qs, ks, vs, douts, outs, lses = (_by_part(_segments(t, w, r, index), parts) for t in tensors)
    dqs, dks, dvs = (_by_part(t, parts) for t in grad_rows)
    for step in range(parts):
        for q0, kv0, count, block_causal in step_runs(parts, step, causal):
            queries, keys = slice(q0, q0 + count), slice(kv0, kv0 + count)
            shares = blocks.attend_backward(
                kernel,
                douts[:, queries],
                qs[:, queries],
                ks[:, keys],
                vs[:, keys],
                outs[:, queries],
                lses[:, queries],
                block_causal,
            )
            for target, where, share in zip((dqs, dks, dvs), (queries, keys, keys), shares):
                target[:, where].add_(share)
    for grad, rows in zip(grads, grad_rows):
        _scatter_back(grad, w, r, index, rows)


class _OneDevice:
    """Every pattern on one device; a ring's shards, if any, simulated block by block."""

    def __init__(self, problem: Problem, kernel: str, backward_kernel: str | None, shard_len: int):
        self.q, self.k, self.v = (t.detach() for t in (problem.q, problem.k, problem.v))
        self.causal, self.kernel, self.backward_kernel = problem.causal, kernel, backward_kernel
        self.patterns = [
            (w, r, w // shard_len if w > shard_len else 1) for w, r in patterns(problem.options, self.q.shape[2])
        ]

    def forward(self, keep_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.q
        if self.kernel == "fused":
            acc, acc_lse = fused_dilated.forward(q, self.k, self.v, self.patterns, self.causal)
        else:
            acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            acc_lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
            for w, r, parts in self.patterns:
                _pattern(q, self.k, self.v, acc, acc_lse, w, r, parts, self.causal, self.kernel)
        return acc.to(q.dtype), acc_lse if keep_lse else None

    def backward(self, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor):
        grads = tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (self.q, self.k, self.v))
        tensors = (self.q, self.k, self.v, dout, out, lse)
        for w, r, parts in self.patterns:
            _pattern_backward(tensors, grads, w, r, parts, self.causal, self.backward_kernel)
        return tuple(grad.to(self.q.dtype) for grad in grads)


def _forward_kernel(option: str, q: torch.Tensor) -> str:
    """``fused`` where it runs, when named or ``auto``; otherwise the library kernel ``blocks.choose`` picks."""
    if option in ("auto", "fused") and fused_dilated.runs_on(q):
        return "fused"
    if option == "fused":
        raise ValueError(f"kernel 'fused' needs Triton and a CUDA device (inputs are on {q.device})")
    return blocks.choose(option, q)


def _setup(problem: Problem, sharded: bool):
    option, q = problem.options["kernel"], problem.q
    kernel = _forward_kernel(option, q)
    problem.facts["kernel"] = kernel
    backward_kernel = None
    if q.requires_grad:
        backward_kernel = blocks.choose("auto" if option == "fused" else option, q, backward=True)
        problem.facts["backward_kernel"] = backward_kernel
    if kernel != "fused":  # the fused kernel merges as it goes
        problem.facts["merge"] = blocks.merge_path(q.device)
    shard_len = q.shape[2]  # the whole sequence, unless sharded
    if sharded:
        assert problem.ring_size is not None, "ring-dilated shards the sequence: its cells have a ring size"
        shard_len //= problem.ring_size
    dilated = _OneDevice(problem, kernel, backward_kernel, shard_len)
    inputs = (problem.q, problem.k, problem.v)
    return lambda: blocks.Differentiable.apply(*inputs, dilated)


def _spanning_pattern(q, k, v, acc, acc_lse, w, r, rank, causal, kernel, comm):
    """One pattern whose segments span g = w / shard_len ranks, across processes.

    The ranks of a segment pass each other only the sparse K/V rows the pattern
    keeps, ring-fashion within the segment, the next transfer posted before the
    current block is computed.
    """
    shard_len = q.shape[2]
    span, place, send_to, receive_from = _segment_ring(w, shard_len, rank)
    # The shard starts at a multiple of r, so the kept rows are those of one shard-long segment.
    index = _offsets_index(q.shape[1], shard_len, r, q.device)
    qs = _segments(q, shard_len, r, index).flatten(1, 2)
    current = torch.stack([_segments(t, shard_len, r, index).flatten(1, 2) for t in (k, v)])
    spare = torch.empty_like(current)
    acc_rows, lse_rows = _segments(acc, shard_len, r, index), _segments(acc_lse, shard_len, r, index)
    for step in range(span):
        transfers = comm.exchange(current, spare, send_to, receive_from) if step + 1 < span else []
        if not (causal and (place - step) % span > place):  # a later shard of the segment: above the diagonal
            out, lse = blocks.attend(kernel, qs, current[0], current[1], causal and step == 0)
            blocks.merge_(acc_rows.flatten(1, 2), lse_rows.flatten(1, 2), out, lse)
            del out, lse
        comm.wait(transfers)
        current, spare = spare, current
    _scatter_back(acc, shard_len, r, index, acc_rows)
    _scatter_back(acc_lse, shard_len, r, index, lse_rows)


def _spanning_pattern_backward(tensors, grads, w, r, rank, causal, kernel, comm):
    """One spanning pattern's share of dq, dk, dv on this rank: as in ``ring``'s backward,
    dq stays here while each sparse K/V block's dk, dv sums travel behind it."""
    q, k, v, dout, out, lse = tensors
    shard_len = q.shape[2]
    span, place, send_to, receive_from = _segment_ring(w, shard_len, rank)
    index = _offsets_index(q.shape[1], shard_len, r, q.device)
    qs, douts, outs, lses = (_segments(t, shard_len, r, index).flatten(1, 2) for t in (q, dout, out, lse))
    current = torch.stack([_segments(t, shard_len, r, index).flatten(1, 2) for t in (k, v)])
    spare = torch.empty_like(current)
    dq_rows = torch.zeros(qs.shape, dtype=torch.float32, device=q.device)
    sums = TravellingSums(
        comm, current.shape, blocks.gradient_dtype(kernel, current.dtype), q.device, span, send_to, receive_from
    )
    for step in range(span):
        transfers = comm.exchange(current, spare, send_to, receive_from) if step + 1 < span else []
        block = None
        if not (causal and (place - step) % span > place):
            block_dq, *block = blocks.attend_backward(
                kernel, douts, qs, current[0], current[1], outs, lses, causal and step == 0
            )
            dq_rows += block_dq
        if step == 0:  # the rank's own block, never skipped
            assert block is not None, "step 0's block is never skipped"
            sums.keep(block)
        else:
            sums.add(step, block)
        comm.wait(transfers)
        current, spare = spare, current
    dkv_rows = torch.empty(current.shape, dtype=torch.float32, device=q.device)
    sums.settle(dkv_rows)
    for grad, share in zip(grads, (dq_rows, *dkv_rows)):
        rows = _segments(grad, shard_len, r, index)
        rows.flatten(1, 2).add_(share)
        _scatter_back(grad, shard_len, r, index, rows)


def _segment_ring(w: int, shard_len: int, rank: int) -> tuple[int, int, int, int]:
    """(ranks a segment spans, this rank's place among them, the rank it sends to, the one it hears from)."""
    span = w // shard_len
    first, place = rank - rank % span, rank % span
    return span, place, first + (place + 1) % span, first + (place - 1) % span


class _OneRank:
    """This process's shard of a ring-dilated computation over ``world_size`` processes."""

    def __init__(self, problem: Problem, kernel: str):
        self.rank, self.causal, self.kernel, self.comm = problem.rank, problem.causal, kernel, problem.comm
        self.shard_len = problem.seq_len // problem.world_size
        start = self.rank * self.shard_len
        self.rows = torch.arange(start, start + self.shard_len, device=problem.device)
        self.q, self.k, self.v = problem.shard(self.rows)
        self.patterns = patterns(problem.options, problem.seq_len)

    def forward(self, keep_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = (t.detach() for t in (self.q, self.k, self.v))
        acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        acc_lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        for w, r in self.patterns:
            if w <= self.shard_len:
                _pattern(q, k, v, acc, acc_lse, w, r, 1, self.causal, self.kernel)
            else:
                _spanning_pattern(q, k, v, acc, acc_lse, w, r, self.rank, self.causal, self.kernel, self.comm)
        return acc.to(q.dtype), acc_lse if keep_lse else None

    def backward(self, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor):
        q, k, v = (t.detach() for t in (self.q, self.k, self.v))
        grads = tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
        tensors = (q, k, v, dout, out, lse)
        for w, r in self.patterns:
            if w <= self.shard_len:
                _pattern_backward(tensors, grads, w, r, 1, self.causal, self.kernel)
            else:
                _spanning_pattern_backward(tensors, grads, w, r, self.rank, self.causal, self.kernel, self.comm)
        return tuple(grad.to(q.dtype) for grad in grads)


def _one_rank(problem: Problem) -> Bench:
    kernel = blocks.choose(problem.options["kernel"], problem.probe(1), backward=problem.inputs.requires_grad)
    problem.facts["kernel"] = kernel
    problem.facts["merge"] = blocks.merge_path(problem.device)
    dilated = _OneRank(problem, kernel)
    inputs = (dilated.q, dilated.k, dilated.v)
    return Bench(run=lambda: blocks.Differentiable.apply(*inputs, dilated), rows=dilated.rows, inputs=inputs)


# Blocks and patterns merge, and gradients add up, in float32.
register_dilated = functools.partial(
    register,
    options=OPTIONS,
    reference=DilatedReference(),
    accumulates="float32",
    flops=_flops,
    memory_model=forward_only(_memory_model),
    excludes=_excludes,
    check_options=_check_options,
    passes=PASSES,
)


@register_dilated("dilated", description="LongNet dilated attention on one device")
def setup_dilated(problem: Problem):
    return _setup(problem, sharded=False)


@register_dilated(
    "ring-dilated", uses_ring=True, distributed=True, description="LongNet dilated attention, ring-sharded"
)
def setup_ring_dilated(problem: Problem):
    if problem.world_size > 1:
        return _one_rank(problem)
    return _setup(problem, sharded=True)
