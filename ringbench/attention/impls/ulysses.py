"""DeepSpeed-Ulysses: sequence shards in, head shards for attention, sequence shards out.

Each of P ranks holds a contiguous 1/P of the sequence for every head. An
all-to-all turns that into every position for H/P heads; each rank runs
full-sequence attention (SDPA with the configured kernel, causal natively) on its
heads; one more all-to-all turns the output back into the rank's sequence shard.
Each all-to-all goes as point-to-point pieces that land where they are used
(:class:`HeadShards`): nothing is copied to gather what is sent or to lay out what
arrives for the kernel.

With ``chunks`` c > 1 the heads go in c chunks, pipelined: chunk i+1's q, k, v are
on their way while chunk i is attended, and chunk i's output travels back during
chunk i+1's attention, so only the first chunk's inbound and the last chunk's
outbound transfer are exposed. On a GPU the transfers are stream-ordered: posting
never blocks the host, and a wait only makes the compute stream wait. ``chunks: 1``
is the plain form: q, k, v's all-to-all, then attention, then the output's.

Every all-to-all goes through the worker's clock (``ringbench.attention.comm``) and
is differentiable, so backward passes send the gradients back the same way, chunk
by chunk; there each all-to-all is waited for at once (autograd gives no later
point to wait at), so backward passes do not overlap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
    return None


def _memory_model(cell: Cell, facts: Mapping[str, Any]) -> int | None:
    """Bytes a call allocates at its peak (see ``ringbench.attention.models``), per rank, in units
    of one sequence shard N (B·H·S·D/P elements), with c chunks.

    Forward: a chunk's q, k and v head shards (3N/c) and its attention output (N/c, with its
    float32 log-sum-exp) are live when the output arrives (N); with more than one chunk the
    chunks' outputs are then joined (N more). Earlier chunks' head shards are gone by then, and
    while a chunk is attended with the next on its way no more is live.

    Forward+backward, with a fused kernel: what every chunk saved for its backward, q, k, v and
    the output in head shards (4N), and the output (N); then, one chunk at a time, its output
    gradient in head shards, its dq, dk and dv and the kernel's float32 dQ accumulator (6N/c);
    and two float32 per row.
    """
    chunks = dict(cell.options)["chunks"]
    shard = shard_bytes(cell)
    if cell.pass_name == "forward":
        return 4 * shard // chunks + row_floats(cell) // chunks + shard + (shard if chunks > 1 else 0)
    if cell.pass_name == "forward+backward" and fused_backward(facts):
        return 5 * shard + 6 * shard // chunks + 2 * row_floats(cell)
    return None


def _check_options(options: Mapping[str, Any]) -> str | None:
    if options["chunks"] < 1:
        return f"chunks must be at least 1 (got {options['chunks']})"
    return None


@dataclass(frozen=True)
class HeadShards:
    """Sequence shards ↔ head shards among ``ranks`` (global ranks in group order; this one is ``ranks[index]``).

    A sequence shard is (B, H, S/P, D): this rank's rows, every head. A head shard is
    (B, H/P, S, D): every row of the heads this rank attends, the ``index``-th P-th of
    them. Every (batch, head) row block of one side is one contiguous piece of the
    other, so the all-to-all goes piece by piece, each landing in place: no copy
    gathers what is sent, and none rearranges what arrives for the attention kernel.
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
        batch, heads, rows, dim = sources[0].shape
        processes = len(self.ranks)
        if self.to_heads:  # one (T, B, H/P, S, D) tensor: its T head shards are contiguous, as SDPA wants them
            return [sources[0].new_empty(len(sources), batch, heads // processes, rows * processes, dim)]
        return [source.new_empty(batch, heads * processes, rows // processes, dim) for source in sources]

    def pieces(self, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> Iterable[Piece]:
        if self.to_heads:
            return ((shard, head, peer) for shard, head, peer in self._blocks(sources, targets[0].unbind()))
        return ((head, shard, peer) for shard, head, peer in self._blocks(targets, sources))

    def _blocks(self, shards: Sequence[torch.Tensor], heads: Sequence[torch.Tensor]) -> Iterator[Piece]:
        """(rows of a sequence shard, rows of a head shard, peer): for the peer, this rank's rows of the
        peer's heads and the peer's rows of this rank's heads, one (batch, head) row block at a time."""
        for shard, head in zip(shards, heads, strict=True):
            batch, heads_here, seq_len, _ = head.shape
            rows = seq_len // len(self.ranks)
            for j, peer in enumerate(self.ranks):
                mine = shard[:, j * heads_here : (j + 1) * heads_here]
                theirs = head[:, :, j * rows : (j + 1) * rows]
                if j == self.index:  # stays here: one copy, not a piece per row block
                    yield mine, theirs, peer
                    continue
                for b in range(batch):
                    for h in range(heads_here):
                        yield mine[b, h], theirs[b, h], peer


def to_heads(shards: Sequence[torch.Tensor], clock: WaitClock, group: dist.ProcessGroup | None = None) -> InFlight:
    """Post the all-to-all among the ranks of ``group`` that turns each of ``shards``, (B, H, S/P, D)
    sequence shards, into a head shard: ``arrived()`` gives one (T, B, H/P, S, D) tensor."""
    return post_swap(shards, HeadShards.within(group, to_heads=True), clock)


def to_sequence(heads: torch.Tensor, clock: WaitClock, group: dist.ProcessGroup | None = None) -> InFlight:
    """Post the all-to-all that turns ``heads``, a (B, H/P, S, D) head shard, back into a (B, H, S/P, D)
    sequence shard: :func:`to_heads` undone."""
    return post_swap([heads], HeadShards.within(group, to_heads=False), clock)


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
    processes, clock = problem.world_size, problem.comm
    seq_len = problem.seq_len
    shard = seq_len // processes
    rows = torch.arange(problem.rank * shard, (problem.rank + 1) * shard, device=problem.device)
    q, k, v = problem.shard(rows)
    per_chunk = q.shape[1] // chunks
    # The kernel SDPA picks for what each rank attends at a time: H/(cP) heads, the whole sequence.
    probe = problem.probe(seq_len, per_chunk // processes)
    problem.facts["kernel"] = resolved_backend(backend, probe, probe, probe, causal)

    def send_chunk(chunk: int) -> InFlight:
        heads = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
        return to_heads([t[:, heads] for t in (q, k, v)], clock)

    def run() -> torch.Tensor:
        inbound, outbound = send_chunk(0), []
        for chunk in range(chunks):
            arriving = inbound
            if chunk + 1 < chunks:  # on its way while this chunk is attended
                inbound = send_chunk(chunk + 1)
            heads_q, heads_k, heads_v = arriving.arrived()[0].unbind()
            with kernel_choice(backend):
                out = F.scaled_dot_product_attention(heads_q, heads_k, heads_v, is_causal=causal)
            outbound.append(to_sequence(out, clock))  # back during the next chunk's attention
        outputs = [in_flight.arrived()[0] for in_flight in outbound]
        return outputs[0] if chunks == 1 else torch.cat(outputs, dim=1)

    return Bench(run=run, rows=rows, inputs=(q, k, v))
