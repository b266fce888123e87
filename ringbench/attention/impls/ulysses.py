"""DeepSpeed-Ulysses: sequence shards in, head shards for attention, sequence shards out.

Each of P ranks holds a contiguous 1/P of the sequence for every head. An
all-to-all turns that into every position for H/P heads; each rank runs
full-sequence attention (SDPA with the configured kernel, causal natively; in passes
with a backward that kernel called directly, for its log-sum-exp, and for ``auto``
the fastest with a backward, as ``blocks.choose`` picks) on its heads;
one more all-to-all turns the output back into the rank's sequence shard.
Each all-to-all goes as point-to-point pieces that land where they are used
(:class:`HeadShards`): nothing is copied to gather what is sent or to lay out what
arrives for the kernel.

With ``chunks`` c > 1 the heads go in c chunks, pipelined: chunk i+1's q, k, v are
on their way while chunk i is attended, and chunk i's output travels back during
chunk i+1's attention, so only the first chunk's inbound and the last chunk's
outbound transfer are exposed. On a GPU the transfers are stream-ordered: posting
never blocks the host, and a wait only makes the compute stream wait. ``chunks: 1``
is the plain form: q, k, v's all-to-all, then attention, then the output's.

Every all-to-all goes through the worker's clock (``ringbench.attention.comm``).
A pass with a backward keeps none of the forward's head shards: its backward
fetches q, k, v, the output and the output gradient again, a part of a few heads at
a time (:func:`blocks.backward_part_heads`), runs the block kernel's backward on them and
sends the part's gradients home before the next part. Beyond its inputs and
gradients a rank then holds one part's head shards, not every head's, at the cost
of sending four more shards per call; each of these all-to-alls is waited for at
once, so backward passes do not overlap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringbench.attention import blocks
from ringbench.attention.comm import InFlight, Piece, WaitClock, post_swap
from ringbench.attention.impls.sdpa import kernel_choice, resolved_backend
from ringbench.attention.models import fused_backward, row_floats, shard_bytes
from ringbench.attention.registry import Bench, Option, Problem, register
from ringbench.vocabulary import PASSES, Cell


def _excludes(cell: Cell) -> str | None:
    if cell.world_size == 1:
        return "ulysses runs across processes only (in one process it is sdpa)"
    chunks = dict(cell.options)["chunks"]
    if cell.heads % (cell.world_size * chunks):
        return (
            f"ulysses needs heads divisible by the world size times chunks "
            f"({cell.heads} heads, {cell.world_size} processes, {chunks} chunks)"
        )
    if cell.seq_len % cell.world_size:
        return f"seq_len {cell.seq_len} is not divisible by the world size {cell.world_size}"
    backend = dict(cell.options)["backend"]
    if cell.pass_name != "forward" and backend not in blocks.BACKWARD_KERNELS:
        return f"ulysses' backward runs on {', '.join(blocks.BACKWARD_KERNELS[1:])} kernels, not {backend}"
    return None


def _memory_model(cell: Cell, facts: Mapping[str, Any]) -> int | None:
    options = dict(cell.options)
    return memory_model(cell, facts, options["chunks"], attends_own_rows_first(options["own_rows_first"], cell.causal))


def attends_own_rows_first(mode: str, causal: bool) -> bool:
    """Whether a call attends its own rows first, by the ``own_rows_first`` option."""
    return mode == "always" or (mode == "causal" and causal)


def memory_model(cell: Cell, facts: Mapping[str, Any], chunks: int, own_rows_first: bool) -> int | None:
    """Bytes a call of :class:`UlyssesAttention` allocates at its peak (see ``ringbench.attention.models``),
    per rank, in units of one sequence shard N (B·H·S·D/P elements), with c ``chunks``.

    Forward, plain: a chunk's q, k and v head shards (3N/c) and its attention output (N/c, with its
    float32 log-sum-exp) are live when the output arrives (N); with more than one chunk the
    chunks' outputs are then joined (N more). Earlier chunks' head shards are gone by then, and
    while a chunk is attended with the next on its way no more is live. With ``own_rows_first``
    :func:`own_rows_first_peak`.

    Forward+backward, with a fused kernel: the output (N) and its float32 log-sum-exp, which the
    forward keeps, and the gradients (3N); then, for one part of the backward (a share p of N),
    its q, k, v, output and output gradient in head shards (5p), its dq, dk and dv (3p), and the
    kernel's float32 dQ accumulator (2p) and float32 row term; or the forward's peak, if higher.
    """
    shard = shard_bytes(cell)
    if own_rows_first:
        forward = own_rows_first_peak(
            cell.world_size, shard, row_floats(cell), cell.causal, cell.pass_name != "forward"
        )
    else:
        forward = 4 * shard // chunks + row_floats(cell) // chunks + shard + (shard if chunks > 1 else 0)
    if cell.pass_name == "forward":
        return forward
    if cell.pass_name == "forward+backward" and fused_backward(facts):
        heads_here = cell.heads // cell.world_size
        part_heads = blocks.backward_part_heads(cell.batch_size, cell.seq_len, heads_here // chunks)
        part = shard * part_heads // heads_here
        backward = 4 * shard + 10 * part + row_floats(cell) + row_floats(cell) * part_heads // heads_here
        return max(forward, backward) if own_rows_first else backward
    return None


def own_rows_first_peak(processes: int, shard: int, rows: int, causal: bool, keep_lse: bool) -> int:
    """The peak of :meth:`UlyssesAttention._own_rows_first` over the ranks, in bytes, for a shard of
    ``shard`` bytes (N) and ``rows`` bytes of float32 per row (one log-sum-exp). Per block of rows
    (n, λ: a P-th of each), in the order attended: the head shards (3N) and the diagonal (n + λ)
    first; a block of one call adds its output and log-sum-exp (n + λ), and leaves its output (n,
    and λ for the backward); a block of several holds its float32 accumulator (2n) and its first
    call's log-sum-exp beside the output of the call being merged (n + λ), and leaves its output
    as one of one call does. Then the head shards and a merged diagonal go, and the output's
    all-to-all receives N (and the log-sum-exps kept are joined, λ·P more)."""
    n, lse = shard // processes, rows // processes
    kept = lse if keep_lse else 0
    peak = 0
    for index in range(processes):
        live = 3 * shard + n + lse
        peak = max(peak, live)
        for block in range(processes):
            calls = 1 + (block > 0) if causal else 1 if block != index else 1 + (block > 0) + (block < processes - 1)
            if calls == 1 and block != index:
                peak, live = max(peak, live + n + lse), live + n + kept
            elif calls > 1 and block == index:  # the diagonal is the first call's result, held
                peak, live = max(peak, live + 3 * n + lse), live + n
            elif calls > 1:
                peak, live = max(peak, live + 3 * n + 2 * lse), live + n + kept
        merged = (index > 0) if causal else processes > 1
        live -= 3 * shard + (n if merged else 0) + (lse - kept)
        peak = max(peak, live + shard + (rows if keep_lse else 0))
    return peak


def _check_options(options: Mapping[str, Any]) -> str | None:
    if options["chunks"] < 1:
        return f"chunks must be at least 1 (got {options['chunks']})"
    if options["chunks"] > 1 and options["own_rows_first"] != "never":
        return "chunks > 1 pipelines heads, own_rows_first overlaps within one chunk: set own_rows_first: never"
    return None


@dataclass(frozen=True)
class HeadShards:
    """Sequence shards ↔ head shards among ``ranks`` (global ranks in group order; this one is ``ranks[index]``).

    A sequence shard holds this rank's rows of every head, grouped by the rank that
    attends them: (B, P, h, S/P, D), where rank j attends heads [j·h, (j+1)·h) of the
    shard's h·P. A head shard is (B, h, S, D): every row of this rank's h heads. Every
    (batch, head) row block of one side is one contiguous piece of the other, so the
    all-to-all goes piece by piece, each landing in place: no copy gathers what is
    sent, and none rearranges what arrives for the attention kernel.
    """

    ranks: tuple[int, ...]
    index: int
    to_heads: bool  # sequence shards in, head shards out; else the way back

    @classmethod
    def within(cls, group: dist.ProcessGroup | None, to_heads: bool) -> HeadShards:
        """Among the ranks of ``group`` (the default group: every rank)."""
        ranks = tuple(dist.get_process_group_ranks(group)) if group else tuple(range(dist.get_world_size()))
        return cls(ranks, ranks.index(dist.get_rank()), to_heads)

    def targets(self, sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.to_heads:  # one (T, B, h, S, D) tensor: its T head shards are contiguous, as the kernels want them
            batch, processes, heads, rows, dim = sources[0].shape
            return [sources[0].new_empty(len(sources), batch, heads, rows * processes, dim)]
        batch, heads, seq_len, dim = sources[0].shape
        processes = len(self.ranks)
        return [source.new_empty(batch, processes, heads, seq_len // processes, dim) for source in sources]

    def pieces(self, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> Iterable[Piece]:
        if self.to_heads:
            return self._blocks(sources, [self.row_blocks(head) for head in targets[0].unbind()])
        return self.returning(targets, [self.row_blocks(head) for head in sources])

    def row_blocks(self, head: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A head shard's P blocks of rows, block j being rank j's sequence shard (views)."""
        return head.split(head.shape[2] // len(self.ranks), dim=2)

    def returning(self, shards: Sequence[torch.Tensor], heads: Sequence[Sequence[torch.Tensor]]) -> Iterator[Piece]:
        """The way back for head shards given as their P row blocks each (``heads``), into ``shards``."""
        return ((head, shard, peer) for shard, head, peer in self._blocks(shards, heads))

    def _blocks(self, shards: Sequence[torch.Tensor], heads: Sequence[Sequence[torch.Tensor]]) -> Iterator[Piece]:
        """(rows of a sequence shard, rows of a head shard, peer): for the peer, this rank's rows of the
        peer's heads and the peer's rows of this rank's heads, one (batch, head) row block at a time."""
        for shard, row_blocks in zip(shards, heads, strict=True):
            batch, heads_here = row_blocks[0].shape[:2]
            for j, peer in enumerate(self.ranks):
                mine, theirs = shard[:, j], row_blocks[j]
                if j == self.index:  # stays here: one copy, not a piece per row block
                    yield mine, theirs, peer
                    continue
                for b in range(batch):
                    for h in range(heads_here):
                        yield mine[b, h], theirs[b, h], peer


def by_rank(shard: torch.Tensor, processes: int) -> torch.Tensor:
    """A (B, H, S/P, D) sequence shard viewed as (B, P, H/P, S/P, D): heads grouped by the rank attending them."""
    return shard.unflatten(1, (processes, -1))


def to_heads(shards: Sequence[torch.Tensor], clock: WaitClock, group: dist.ProcessGroup | None = None) -> InFlight:
    """Post the all-to-all among the ranks of ``group`` that turns each of ``shards``, (B, H, S/P, D)
    sequence shards, into a head shard: ``arrived()`` gives one (T, B, H/P, S, D) tensor."""
    layout = HeadShards.within(group, to_heads=True)
    return post_swap([by_rank(shard, len(layout.ranks)) for shard in shards], layout, clock)


def to_sequence(heads: torch.Tensor, clock: WaitClock, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The all-to-all that turns ``heads``, a (B, H/P, S, D) head shard, back into a (B, H, S/P, D)
    sequence shard (:func:`to_heads` undone), waited for."""
    return post_swap([heads], HeadShards.within(group, to_heads=False), clock).arrived()[0].flatten(1, 2)


@dataclass(frozen=True)
class UlyssesAttention:
    """Attention over sequence shards ``q``, ``k``, ``v`` by way of head shards, for
    :class:`blocks.Differentiable`: ``forward`` sends q, k and v to head shards, attends each rank's
    heads over the whole sequence, and sends the output back: with ``own_rows_first``, attending the
    rank's own rows of its heads while the rest arrive (:meth:`_own_rows_first`), else in ``chunks``
    of heads, pipelined; ``backward`` goes in parts of :func:`blocks.backward_part_heads` heads and
    keeps nothing of the forward's head shards: it fetches what it needs again, four more shards sent
    per call.

    ``attend`` is the attention of a forward pass that keeps no log-sum-exp; one that keeps it, and
    the backward, run the block ``kernel``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    chunks: int
    own_rows_first: bool
    kernel: str
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    clock: WaitClock
    group: dist.ProcessGroup | None = None

    @functools.cached_property
    def _inward(self) -> HeadShards:
        return HeadShards.within(self.group, to_heads=True)

    @functools.cached_property
    def _outward(self) -> HeadShards:
        return HeadShards.within(self.group, to_heads=False)

    def _heads(self, tensor: torch.Tensor, chunk: int) -> torch.Tensor:
        """Chunk ``chunk``'s heads of a sequence shard, grouped by the rank that attends them."""
        per_chunk = tensor.shape[1] // self.chunks
        return by_rank(tensor[:, chunk * per_chunk : (chunk + 1) * per_chunk], len(self._inward.ranks))

    def forward(self, keep_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.own_rows_first:
            return self._own_rows_first(keep_lse)

        def send(chunk: int) -> InFlight:
            return post_swap([self._heads(t, chunk) for t in (self.q, self.k, self.v)], self._inward, self.clock)

        inbound, outbound, lses = send(0), [], []
        for chunk in range(self.chunks):
            arriving = inbound
            if chunk + 1 < self.chunks:  # on its way while this chunk is attended
                inbound = send(chunk + 1)
            q, k, v = arriving.arrived()[0].unbind()
            if keep_lse:
                out, lse = blocks.attend(self.kernel, q, k, v, self.causal)
                lses.append(lse)
            else:
                out = self.attend(q, k, v)
            outbound.append(post_swap([out], self._outward, self.clock))  # back during the next chunk's attention
        outputs = [in_flight.arrived()[0].flatten(1, 2) for in_flight in outbound]
        out = outputs[0] if self.chunks == 1 else torch.cat(outputs, dim=1)
        return out, torch.cat(lses, dim=1) if keep_lse else None

    def _own_rows_first(self, keep_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward in one chunk, its inbound all-to-all hidden behind the one block that needs none.

        Of the head shard's P blocks of rows (block j: rank j's sequence shard), this rank holds its
        own block's q, k and v from the start: that block attended to itself (the diagonal, causal
        when the attention is) runs while the all-to-all brings the rest. Then each block of rows
        attends the keys it has left, in as few calls as are contiguous (non-causal: every key, or
        for the own block the keys before and after it; causal: the keys before the block, and its
        own diagonal), merged in float32 by log-sum-exp where a block took more than one call.
        Besides hiding the transfer, cutting a long causal attention into its diagonal blocks and
        the full blocks below them spares the kernel the imbalance of one long causal call.
        """
        sources = [self._heads(t, 0) for t in (self.q, self.k, self.v)]
        inbound = post_swap(sources, self._inward, self.clock)
        index = self._inward.index
        own_q, own_k, own_v = (source[:, index] for source in sources)  # here already: no wait
        diagonal = blocks.attend(self.kernel, own_q, own_k, own_v, self.causal)
        heads = inbound.arrived()[0]
        blocks_of_rows = len(self._inward.ranks)
        rows = [self._attend_rows(heads, j, diagonal if j == index else None, keep_lse) for j in range(blocks_of_rows)]
        del inbound, heads, diagonal  # the head shards, freed before the output's all-to-all allocates
        outputs = [out for out, _ in rows]
        batch, heads_here, size, dim = outputs[0].shape
        home = outputs[0].new_empty(batch, blocks_of_rows, heads_here, size, dim)
        self.clock.wait(self.clock.swap(self._outward.returning([home], [outputs])))
        lses = [lse for _, lse in rows if lse is not None]
        return home.flatten(1, 2), torch.cat(lses, dim=2) if keep_lse else None

    def _attend_rows(
        self,
        heads: torch.Tensor,
        block: int,
        diagonal: tuple[torch.Tensor, torch.Tensor] | None,
        keep_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``block`` of the head shard's rows (``heads``: q, k and v stacked) over every key it
        attends: its output and, with ``keep_lse``, its log-sum-exp. ``diagonal``: the block already
        attended to its own keys."""
        q, k, v = heads.unbind()
        seq_len = q.shape[2]
        size = seq_len // len(self._inward.ranks)
        start, stop = block * size, (block + 1) * size
        own, before, after = slice(start, stop), slice(0, start), slice(stop, seq_len)
        if self.causal:
            spans = [(own, True), (before, False)]
        elif diagonal is None:
            spans = [(slice(0, seq_len), False)]
        else:
            spans = [(own, False), (before, False), (after, False)]
        spans = [(keys, causal) for keys, causal in spans if keys.stop > keys.start]
        queries = q[:, :, own]
        first = diagonal or blocks.attend(self.kernel, queries, k[:, :, spans[0][0]], v[:, :, spans[0][0]], spans[0][1])
        if len(spans) == 1:
            return first if keep_lse else (first[0], None)
        acc, acc_lse = first[0].float(), first[1]
        del first
        for keys, causal in spans[1:]:
            blocks.merge_(acc, acc_lse, *blocks.attend(self.kernel, queries, k[:, :, keys], v[:, :, keys], causal))
        return acc.to(q.dtype), acc_lse if keep_lse else None

    def backward(self, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads = tuple(torch.empty_like(t) for t in (self.q, self.k, self.v))
        batch, heads_here, seq_len = lse.shape
        heads_per_chunk = heads_here // self.chunks
        step = blocks.backward_part_heads(batch, seq_len, heads_per_chunk)
        for chunk in range(self.chunks):
            for first in range(0, heads_per_chunk, step):
                part = slice(first, first + step)
                lse_heads = slice(chunk * heads_per_chunk + part.start, chunk * heads_per_chunk + part.stop)
                self._backward_part(chunk, part, dout, out, lse[:, lse_heads], grads)
        return grads

    def _backward_part(
        self,
        chunk: int,
        part: slice,
        dout: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        grads: Sequence[torch.Tensor],
    ) -> None:
        """The gradients of ``part`` of this rank's heads of ``chunk``, sent home into ``grads``; what
        the part fetched and computed is freed on return, before the next part allocates its own."""
        # Two messages, so that no buffer outgrows q, k and v's.
        inbound = [
            post_swap([self._heads(t, chunk)[:, :, part] for t in tensors], self._inward, self.clock)
            for tensors in ((self.q, self.k, self.v), (out, dout))
        ]
        (q, k, v), (o, do) = (in_flight.arrived()[0].unbind() for in_flight in inbound)
        part_grads = blocks.attend_backward(self.kernel, do, q, k, v, o, lse, self.causal)
        sent = [grad.contiguous().to(self.q.dtype) for grad in part_grads]  # math blocks give float32
        homes = [self._heads(grad, chunk)[:, :, part] for grad in grads]
        self.clock.wait(self.clock.swap(self._outward.pieces(sent, homes)))


@register(
    "ulysses",
    distributed=True,
    options={
        "backend": Option(
            "auto",
            choices=("auto", "flash", "efficient", "cudnn", "math"),
            help="SDPA kernel of the full-sequence attention on each rank's heads",
        ),
        # Plain by default: on two and four H200s two pipelined chunks were 1.4-3.7% slower than one
        # in every cell (results/evidence/20261128T151819Z-183bfe4b, 20261128T153644Z-35cabcef): hiding
        # the transfers gains less than splitting the attention, and running it beside them, costs.
        "chunks": Option(
            1,
            help="chunks of heads, pipelined: the next chunk's all-to-all and the last one's output's overlap "
            "this chunk's attention; 1 is the plain form",
        ),
        # In causal attention only by default: on two H200s it was 7% faster than plain causal and 1.5%
        # slower non-causal (results/evidence/20261128T211649Z-79be4d57), where cutting the one long
        # call into three costs more than the hidden transfer saves.
        "own_rows_first": Option(
            "causal",
            choices=("causal", "always", "never"),
            help="attend this rank's own rows of its heads while the all-to-all brings the others, then the "
            "rest, causal attention cut into diagonal and full blocks (chunks: 1 only): in causal attention, "
            "always, or never (the plain form)",
        ),
    },
    passes=PASSES,
    excludes=_excludes,
    check_options=_check_options,
    memory_model=_memory_model,
    description="DeepSpeed-Ulysses: all-to-all from sequence to head shards, SDPA on H/P heads, all-to-all back",
)
def setup(problem: Problem) -> Bench:
    assert problem.comm is not None, "across processes the worker hands setup a clock"
    backend, chunks, causal = problem.options["backend"], problem.options["chunks"], problem.causal
    shard = problem.seq_len // problem.world_size
    rows = torch.arange(problem.rank * shard, (problem.rank + 1) * shard, device=problem.device)
    q, k, v = problem.shard(rows)
    # What each rank attends at a time: H/(cP) heads, the whole sequence.
    probe = problem.probe(problem.seq_len, q.shape[1] // chunks // problem.world_size)
    first = attends_own_rows_first(problem.options["own_rows_first"], causal)
    if problem.inputs.requires_grad or first:
        # the block kernels give the log-sum-exp that the backward and the merges of own_rows_first need
        kernel = blocks.choose(backend, probe, backward=problem.inputs.requires_grad)
    else:
        kernel = resolved_backend(backend, probe, probe, probe, causal)
    problem.facts["kernel"] = kernel

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with kernel_choice(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    attention = UlyssesAttention(q, k, v, causal, chunks, first, kernel, sdpa, problem.comm)
    return Bench(run=lambda: blocks.Differentiable.apply(q, k, v, attention), rows=rows, inputs=(q, k, v))
