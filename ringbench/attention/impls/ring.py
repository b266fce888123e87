"""Ring attention (Liu et al. 2023) on one device.

The sequence is split into ``ring_size`` shards, one per (simulated) rank. In ring
step t every rank r attends its query shard to the K/V shard of rank (r − t) mod P,
the one it would have just received from its neighbour. Each block is computed by a
fused kernel that returns the log-sum-exp, and partial results are merged in float32.

On one device the blocks of a step run as at most two batched kernel calls, the ranks
in the place of heads (:class:`_AllRanks`), since a device would otherwise run the ranks
one after another. So that a single device's tiling is
never presented as distribution, ``rank_share`` runs one rank's share alone (its query
shard against every K/V shard, received into a buffer as a rank would), and the
harness reports its time and memory as a per-rank *projection*.

Across processes (world size > 1) each process is one rank holding one shard,
and K/V blocks rotate by the GPUs' copy engines into the next rank's buffers
(``ringbench.attention.peer_copy``), which leaves every SM to the blocks, where the ranks
are GPUs of one host (``transfers: auto``, the default, or ``copy-engine``); elsewhere, or
with ``transfers: nccl``, by torch.distributed point-to-point ops. Either way the next
transfer is posted before the current block is computed and waited for after it. Its backward
goes in parts of heads, as few as the memory allows, each a ring of its own
(``OneRank.backward``, :func:`backward_part_heads`).

Causal: the diagonal block runs causal and blocks wholly above the diagonal are
skipped. With ``zigzag`` the sequence is cut into 2P chunks and rank r holds chunks
r and 2P−1−r, so every rank does the same work in every step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ringbench.attention import blocks, peer_copy
from ringbench.attention.comm import TravellingSums, WaitClock, sums_slots
from ringbench.attention.models import fused_backward, row_floats, shard_bytes
from ringbench.attention.registry import Bench, Option, Problem, register
from ringbench.vocabulary import DTYPE_BYTES, PASSES, Cell

TRANSFERS = ("auto", "nccl", "copy-engine")


@dataclass(frozen=True)
class BlockSpec:
    """One rank's block in one step: which K/V shard, and which rows of each shard."""

    kv_rank: int
    q_rows: slice
    kv_rows: slice
    causal: bool


def ring_block(rank: int, step: int, ring_size: int, shard_len: int, causal: bool, zigzag: bool) -> BlockSpec | None:
    """The block rank ``rank`` computes in ring step ``step``; None when it skips the step."""
    kv_rank = (rank - step) % ring_size
    every = slice(0, shard_len)
    if step == 0:
        return BlockSpec(kv_rank, every, every, causal)
    if not causal:
        return BlockSpec(kv_rank, every, every, False)
    if zigzag:
        half = shard_len // 2
        if kv_rank < rank:  # K/V chunk kv_rank precedes both query chunks; chunk 2P−1−kv_rank follows both
            return BlockSpec(kv_rank, every, slice(0, half), False)
        # Only the later query chunk (2P−1−rank) sees this rank's K/V, and it sees both chunks.
        return BlockSpec(kv_rank, slice(half, shard_len), every, False)
    return BlockSpec(kv_rank, every, every, False) if kv_rank < rank else None


def _zigzag_order(ring_size: int) -> list[int]:
    """Chunk order of a zigzag-sharded sequence: rank r holds chunks r and 2P−1−r."""
    return [chunk for rank in range(ring_size) for chunk in (rank, 2 * ring_size - 1 - rank)]


def positions(seq_len: int, ring_size: int, zigzag: bool, device: torch.device | None = None) -> torch.Tensor:
    """(P, S/P): the sequence positions each rank's shard holds, in shard order."""
    chunks = torch.arange(seq_len, device=device).view(2 * ring_size if zigzag else ring_size, -1)
    if zigzag:
        chunks = chunks[_zigzag_order(ring_size)]
    return chunks.reshape(ring_size, -1)


@dataclass(frozen=True)
class RankRun:
    """Ranks ``first`` … ``first + count − 1`` in one ring step, whose K/V ranks follow on from
    ``kv_first`` and whose blocks take the same rows: one batched kernel call."""

    first: int
    count: int
    kv_first: int
    q_rows: slice
    kv_rows: slice
    causal: bool


def step_runs(step: int, ring_size: int, shard_len: int, causal: bool, zigzag: bool) -> list[RankRun]:
    """Ring step ``step`` of every rank (:func:`ring_block`) as runs of ranks: at most two, split
    where the K/V rank wraps round the ring or the rows a block takes change."""
    runs: list[RankRun] = []
    for rank in range(ring_size):
        spec = ring_block(rank, step, ring_size, shard_len, causal, zigzag)
        if spec is None:
            continue
        if runs:
            last = runs[-1]
            follows = (last.first + last.count, last.kv_first + last.count) == (rank, spec.kv_rank)
            if follows and (last.q_rows, last.kv_rows, last.causal) == (spec.q_rows, spec.kv_rows, spec.causal):
                runs[-1] = RankRun(last.first, last.count + 1, last.kv_first, last.q_rows, last.kv_rows, last.causal)
                continue
        runs.append(RankRun(rank, 1, spec.kv_rank, spec.q_rows, spec.kv_rows, spec.causal))
    return runs


class _AllRanks:
    """Every rank of the ring on one device, each step's blocks batched into at most two calls.

    The forward works on the inputs laid out rank by rank, (B·H, P, S/P, D) with the ranks in the
    place of heads: a view of the inputs in their natural order, or, with zigzag, where a rank's two
    chunks lie apart and the second ones run backwards, a copy in shard order that each call makes.
    A run of ranks (:func:`step_runs`) then goes to the kernel as one strided view of its query
    shards and one of its K/V shards, so a step of any ring size is one or two calls on blocks of a
    rank's size, merged into a float32 accumulator laid out the same way.
    """

    def __init__(self, problem: Problem, kernel: str, zigzag: bool):
        self.kernel, self.zigzag, self.causal, self.dtype = kernel, zigzag, problem.causal, problem.q.dtype
        self.natural = tuple(t.detach() for t in (problem.q, problem.k, problem.v))
        assert problem.ring_size is not None, "ring shards the sequence: its cells have a ring size"
        self.ring_size = problem.ring_size
        self.shard_len = problem.q.shape[2] // problem.ring_size
        self.chunk_count = self.ring_size * (2 if zigzag else 1)
        # Zigzag shards are not in the sequence's order, except in a ring of one.
        self.reordered = zigzag and self.ring_size > 1

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, S, …) → (B·H, chunks, S / chunks, …), a view."""
        b, h, s = x.shape[:3]
        return x.view(b * h, self.chunk_count, s // self.chunk_count, *x.shape[3:])

    def _zigzag_halves(self, shards: torch.Tensor, chunks: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Pairs of (rows of the rank-by-rank layout, the same rows of the natural chunks) that cover
        zigzag's shards. Copies of these strided blocks run at the memory's speed, where index_select's
        gather does not."""
        half = self.shard_len // 2
        yield shards[:, :, :half], chunks[:, : self.ring_size]  # the first chunks: 0 … P−1, in order
        for rank in range(self.ring_size):  # the second: 2P−1 … P, backwards
            yield shards[:, rank, half:], chunks[:, 2 * self.ring_size - 1 - rank]

    def _by_rank(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, S, …) in natural order → (B·H, P, S/P, …) in shard order: a view, or with zigzag a copy."""
        chunks = self._chunked(x)
        if not self.reordered:
            return chunks.view(chunks.shape[0], self.ring_size, self.shard_len, *x.shape[3:])
        shards = x.new_empty(chunks.shape[0], self.ring_size, self.shard_len, *x.shape[3:])
        for shard, chunk in self._zigzag_halves(shards, chunks):
            shard.copy_(chunk)
        return shards

    def _natural(self, x: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`_by_rank` undone: ``x`` in natural order as ``shape``, cast to ``dtype``."""
        if not self.reordered:
            return x.to(dtype).reshape(shape)  # a kernel's log-sum-exp may be a slice
        natural = x.new_empty(shape, dtype=dtype)
        for shard, chunk in self._zigzag_halves(x, self._chunked(natural)):
            chunk.copy_(shard)  # each copy casts as it goes
        return natural

    def forward(self, keep_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = (self._by_rank(t) for t in self.natural)
        acc = acc_lse = None
        for step in range(self.ring_size):
            for run in step_runs(step, self.ring_size, self.shard_len, self.causal, self.zigzag):
                ranks, kv_ranks = slice(run.first, run.first + run.count), slice(run.kv_first, run.kv_first + run.count)
                out, lse = blocks.attend(
                    self.kernel,
                    q[:, ranks, run.q_rows],
                    k[:, kv_ranks, run.kv_rows],
                    v[:, kv_ranks, run.kv_rows],
                    run.causal,
                )
                if acc is None:  # step 0: every rank's diagonal block, in one run
                    acc, acc_lse = out.float(), lse
                else:
                    assert acc_lse is not None, "set with acc"
                    blocks.merge_(acc[:, ranks, run.q_rows], acc_lse[:, ranks, run.q_rows], out, lse)
                del out, lse  # free the block before the next one (or the output) is allocated
        del q, k, v  # zigzag's copies, freed before the output is made
        assert acc is not None and acc_lse is not None, "step 0's blocks, the diagonal, are never skipped"
        shape = self.natural[0].shape
        lse = self._natural(acc_lse, shape[:-1], torch.float32) if keep_lse else None
        return self._natural(acc, shape, self.dtype), lse

    def backward(self, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor):
        """Gradients in natural order, K/V chunk by K/V chunk.

        One device holds every rank, so the sharding (zigzag or not) changes which
        rank owns a block, not the sum: blocks are taken in natural order. Each K/V
        chunk's dk, dv add up in float32 over the query chunks that see it, then are
        stored; dq adds up in float32 over all chunks. So only one chunk's partial
        dk, dv is alive at a time beside the dq accumulator.
        """
        q, k, v = self.natural
        chunks = [slice(i * self.shard_len, (i + 1) * self.shard_len) for i in range(self.ring_size)]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        for j, kv_rows in enumerate(chunks):
            dk_sum = dv_sum = None
            for i in range(j if self.causal else 0, self.ring_size):
                q_rows = chunks[i]
                block_dq, block_dk, block_dv = blocks.attend_backward(
                    self.kernel,
                    dout[:, :, q_rows],
                    q[:, :, q_rows],
                    k[:, :, kv_rows],
                    v[:, :, kv_rows],
                    out[:, :, q_rows],
                    lse[:, :, q_rows],
                    self.causal and i == j,
                )
                dq[:, :, q_rows] += block_dq
                if dk_sum is None:
                    dk_sum, dv_sum = block_dk.float(), block_dv.float()
                else:
                    dk_sum += block_dk
                    dv_sum += block_dv
                del block_dq, block_dk, block_dv
            assert dk_sum is not None and dv_sum is not None, "every K/V chunk is seen by its own query chunk"
            dk[:, :, kv_rows], dv[:, :, kv_rows] = dk_sum, dv_sum
        return dq.to(self.dtype), dk, dv


def _all_ranks(problem: Problem, kernel: str, zigzag: bool) -> Bench:
    ring = _AllRanks(problem, kernel, zigzag)
    q, k, v = ring.natural
    ring_size, shard_len = ring.ring_size, ring.shard_len
    shard_rows = positions(q.shape[2], ring_size, zigzag, q.device)
    # The busiest rank: all ranks are equal unless causal without zigzag, where the last does most.
    rank = ring_size - 1
    own: dict[str, torch.Tensor] = {}

    def rank_share() -> torch.Tensor:
        if not own:  # what the rank holds from the start: its query shard and two receive buffers
            own["q"] = q.index_select(2, shard_rows[rank])
            own["k"], own["v"] = torch.empty_like(own["q"]), torch.empty_like(own["q"])
        received_k, received_v = own["k"], own["v"]
        acc = acc_lse = None
        for step in range(ring_size):
            spec = ring_block(rank, step, ring_size, shard_len, problem.causal, zigzag)
            if spec is None:
                continue
            # What the receive from the neighbour would deliver.
            torch.index_select(k, 2, shard_rows[spec.kv_rank], out=received_k)
            torch.index_select(v, 2, shard_rows[spec.kv_rank], out=received_v)
            out, lse = blocks.attend(
                kernel,
                own["q"][:, :, spec.q_rows],
                received_k[:, :, spec.kv_rows],
                received_v[:, :, spec.kv_rows],
                spec.causal,
            )
            if acc is None:
                acc, acc_lse = out.float(), lse
            else:
                assert acc_lse is not None, "set with acc"
                blocks.merge_(acc[:, :, spec.q_rows], acc_lse[:, :, spec.q_rows], out, lse)
            del out, lse
        assert acc is not None, "step 0's block, the diagonal, is never skipped"
        return acc

    inputs = (problem.q, problem.k, problem.v)
    return Bench(run=lambda: blocks.Differentiable.apply(*inputs, ring), rank_share=rank_share)


def receive_buffers(shape: Sequence[int], like: torch.Tensor, ring_size: int) -> tuple[torch.Tensor, ...]:
    """Where a rank of a ring of ``ring_size`` receives K/V messages of ``shape`` (in ``like``'s dtype,
    on its device), by turns.

    The rank's own shard is never written over, since every call starts from it; the
    buffer being sent is never the one being received into. One is enough when only
    one transfer happens, none in a ring of one. Made once per cell, so that no call
    allocates them.
    """
    return tuple(like.new_empty(shape) for _ in range(_receive_buffer_count(ring_size)))


def _receive_buffer_count(ring_size: int) -> int:
    return min(2, ring_size - 1)


def receive_buffer_bytes(cell: Cell, ring_size: int) -> int:
    """What :func:`receive_buffers` keeps on a rank of a ring of ``ring_size`` across the cell's
    processes, each buffer K and V of one shard (2N)."""
    return 2 * shard_bytes(cell) * _receive_buffer_count(ring_size)


def merges_in_place(ring_size: int, element_bytes: int) -> bool:
    """Whether a rank of a ring across processes merges its blocks into its first block's output
    (:meth:`OneRank.forward`): where each row takes one merge at most, in a dtype narrower than
    float32."""
    return ring_size <= 2 and element_bytes < 4


class OneRank:
    """One rank of a real ring: K/V travel between processes by point-to-point ops or copy engines.

    Built from this rank's shards as they are: ``q`` and ``kv`` (K and V stacked,
    the one message each step sends), in the row order of ring rank ``rank``'s
    shard (``positions``); ``send_to`` and ``receive_from`` are the global ranks of
    its neighbours in the ring, ``received`` its :func:`receive_buffers`, or with ``peers``
    (copy-engine transfers) the K/V slots of ``peers``.
    """

    def __init__(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        *,
        causal: bool,
        kernel: str,
        zigzag: bool,
        comm: WaitClock,
        rank: int,
        ring_size: int,
        send_to: int,
        receive_from: int,
        received: tuple[torch.Tensor, ...],
        peers: peer_copy.RingPeers | None = None,
        part_heads: int | None = None,
    ):
        self.kernel, self.zigzag, self.causal, self.dtype = kernel, zigzag, causal, q.dtype
        self.rank, self.ring_size, self.comm, self.peers = rank, ring_size, comm, peers
        self.q, self.kv, self.received = q, kv, received
        self.shard_len = q.shape[2]
        self.send_to, self.receive_from = send_to, receive_from
        batch, heads = q.shape[:2]
        self.part_heads = part_heads or blocks.backward_part_heads(batch, self.shard_len, heads)

    def _pass_on(
        self, current: torch.Tensor, step: int, received: tuple[torch.Tensor, ...]
    ) -> tuple[list, torch.Tensor | None]:
        """Post step ``step``'s transfer: ``current`` to the next rank, the previous rank's K/V
        into one of ``received``. Returns the requests and that buffer (none after the last step)."""
        if step + 1 == self.ring_size:
            return [], None
        incoming = received[step % len(received)]
        through = self.peers.kv if self.peers else None
        return self.comm.exchange(current, incoming, self.send_to, self.receive_from, through), incoming

    def _block(self, step: int) -> BlockSpec | None:
        return ring_block(self.rank, step, self.ring_size, self.shard_len, self.causal, self.zigzag)

    def forward(self, keep_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, comm = self.q.detach(), self.comm
        current = self.kv
        acc = acc_lse = None
        # Two blocks at most, in a dtype narrower than float32: the second merges into the first's
        # output in place, computed in float32 and rounded once, as a float32 accumulator's cast
        # is, without making, merging into and casting one (three passes over memory).
        in_place = merges_in_place(self.ring_size, self.dtype.itemsize)
        for step in range(self.ring_size):
            # The next block's K/V is on its way while this one is computed.
            transfers, incoming = self._pass_on(current, step, self.received)
            spec = self._block(step)
            if spec is not None:
                out, lse = blocks.attend(
                    self.kernel,
                    q[:, :, spec.q_rows],
                    current[0][:, :, spec.kv_rows],
                    current[1][:, :, spec.kv_rows],
                    spec.causal,
                )
                if acc is None:  # step 0 is the full diagonal block
                    acc, acc_lse = (out if in_place else out.float()), lse
                else:
                    assert acc_lse is not None, "set with acc"
                    blocks.merge_(acc[:, :, spec.q_rows], acc_lse[:, :, spec.q_rows], out, lse)
                del out, lse
            comm.wait(transfers)
            if incoming is not None:  # none after the last step
                current = incoming
        assert acc is not None, "step 0's block, the diagonal, is never skipped"
        return acc.to(self.dtype), acc_lse if keep_lse else None

    def backward(self, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor):
        """Gradients in parts of ``part_heads`` heads (:func:`backward_part_heads`): each part's K/V go round
        the ring once more, the dK, dV sums of each K/V shard travelling one step behind it
        (``comm.TravellingSums``), so that what a part holds is one part's heads, not every head's.
        The gradients are allocated once and each part's written into them. A part's sums come home
        while the next part's first block is computed."""
        dq, dkv = torch.empty_like(self.q), torch.empty_like(self.kv)
        home = _nothing
        for first in range(0, self.q.shape[1], self.part_heads):
            part = slice(first, first + self.part_heads)
            dq[:, part], sums = self._backward_part(part, dout[:, part], out[:, part], lse[:, part], home)
            home = functools.partial(sums.settle, dkv[:, :, part])
        home()
        return dq, *dkv.unbind()

    def _backward_part(
        self, heads: slice, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, home: Callable[[], None]
    ) -> tuple[torch.Tensor, TravellingSums]:
        """The float32 dq of this rank's rows of ``heads``, and the dK/dV sums of its K/V shard: its own
        gradient, kept, and the other ranks', on their way home. ``home`` brings the previous part's
        sums home, behind this part's first block."""
        q, comm = self.q.detach()[:, heads], self.comm
        current = self.kv[:, :, heads].contiguous()  # the part's K and V: the message each step sends
        # Received into the front of the cell's receive buffers, idle in backward.
        received = tuple(buffer.view(-1)[: current.numel()].view(current.shape) for buffer in self.received)
        through = self.peers.sums if self.peers else None
        sums = TravellingSums(
            comm,
            current.shape,
            blocks.gradient_dtype(self.kernel, self.dtype),
            q.device,
            self.ring_size,
            self.send_to,
            self.receive_from,
            through,
        )
        dq = None
        for step in range(self.ring_size):
            transfers, incoming = self._pass_on(current, step, received)
            spec = self._block(step)
            grads = None
            if spec is not None:
                block_dq, *grads = blocks.attend_backward(
                    self.kernel,
                    dout[:, :, spec.q_rows],
                    q[:, :, spec.q_rows],
                    current[0][:, :, spec.kv_rows],
                    current[1][:, :, spec.kv_rows],
                    out[:, :, spec.q_rows],
                    lse[:, :, spec.q_rows],
                    spec.causal,
                )
                if dq is None:  # step 0's block, the diagonal, takes every row
                    dq = block_dq.float()
                else:
                    dq[:, :, spec.q_rows] += block_dq
                del block_dq
            if step == 0:
                assert grads is not None, "step 0's block, the diagonal, is never skipped"
                sums.keep(grads)
                home()
            elif spec is not None:
                sums.add(step, grads, spec.kv_rows)
            else:
                sums.add(step)
            del grads
            comm.wait(transfers)
            if incoming is not None:  # none after the last step
                current = incoming
        assert dq is not None, "step 0's block, the diagonal, is never skipped"
        return dq, sums


def _nothing() -> None:
    """No part's sums on their way home."""


def _one_rank(problem: Problem, kernel: str, zigzag: bool) -> Bench:
    assert problem.comm is not None, "across processes the worker hands setup a clock"
    rank, ring_size = problem.rank, problem.world_size
    rows = positions(problem.seq_len, ring_size, zigzag, problem.device)[rank]
    q, k, v = problem.shard(rows)
    # k and v become views of the one K/V message each step sends, leaves of their own.
    kv = torch.stack([k.detach(), v.detach()])
    k, v = (part.requires_grad_(q.requires_grad) for part in kv.unbind())
    part_heads = backward_part_heads(problem, q.shape[1], q.shape[2], _memory_model, setup_memory)
    peers = ring_peers(problem, kv.shape, ring_size, kernel, _world, part_heads)
    ring = OneRank(
        q,
        kv,
        causal=problem.causal,
        kernel=kernel,
        zigzag=zigzag,
        comm=problem.comm,
        rank=rank,
        ring_size=ring_size,
        send_to=(rank + 1) % ring_size,
        receive_from=(rank - 1) % ring_size,
        received=peers.kv.slots if peers else receive_buffers(kv.shape, kv, ring_size),
        peers=peers,
        part_heads=part_heads,
    )
    inputs = (q, k, v)
    return Bench(run=lambda: blocks.Differentiable.apply(*inputs, ring), rows=rows, inputs=inputs)


# The share of the memory free as setup starts that a backward pass's parts may fill, beside what the
# call allocates besides, the inputs and setup's buffers; the rest is slack (the allocator's rounding).
HEADROOM_SHARE = 0.8


class SetupMemory(Protocol):
    """The bytes setup keeps for a cell, its backward in parts of ``part_heads`` heads (the fewest by default)."""

    def __call__(self, cell: Cell, *, part_heads: int | None = None) -> int: ...


def backward_part_heads(
    problem: Problem,
    heads: int,
    rows: int,
    model: Callable[[Cell, Mapping[str, Any]], int | None],
    kept: SetupMemory,
) -> int | None:
    """Heads per part of ``OneRank``'s backward over ``heads`` heads of ``rows`` rows, noted in the facts:
    the most, halving from every head down to the fewest that still fill the GPU
    (``blocks.backward_part_heads``), whose call fits, by the implementation's memory ``model``, with
    the inputs and what setup keeps for such parts (``kept``: copy-engine transfers keep the buffers
    a part's sums arrive in), in ``HEADROOM_SHARE`` of ``problem.memory_headroom``; the fewest where
    none does, and where the headroom or the model is unknown. (Chosen before the ranks agree on the
    transfers, the model counts the sums' arrival in the call as NCCL's do: with copy-engine transfers
    that arrival is counted twice, which errs on the side of smaller parts.) Fewer heads a part take less memory
    and more time: at 128K tokens over two H200s, parts of 2 heads made the forward+backward 1.7%
    slower than one part of 16 (``results/evidence/probes/probe_part_rows.txt``). None for a
    forward pass."""
    if problem.cell is None or not problem.inputs.requires_grad:
        return None
    batch = problem.inputs.shape[0]
    fewest = blocks.backward_part_heads(batch, rows, heads)
    chosen, cell = fewest, dataclasses.replace(problem.cell, pass_name="forward+backward")
    room = problem.memory_headroom
    if room is not None:
        inputs = 3 * shard_bytes(cell)
        candidate = heads
        while candidate > fewest:
            call = model(cell, {**problem.facts, "backward_part_heads": candidate})
            if call is not None and inputs + kept(cell, part_heads=candidate) + call <= HEADROOM_SHARE * room:
                chosen = candidate
                break
            candidate = -(-candidate // 2)
    problem.facts["backward_part_heads"] = chosen
    return chosen


def ring_peers(
    problem: Problem,
    shape: Sequence[int],
    ring_size: int,
    kernel: str,
    ring_group: Callable[[], dist.ProcessGroup],
    part_heads: int | None,
) -> peer_copy.RingPeers | None:
    """The copy engine's buffers for a ring of ``kernel`` blocks whose K/V messages are of ``shape``,
    shared over the group ``ring_group()`` (asked for only here), where the cell's transfers are not
    ``nccl`` and the ranks allow copy-engine transfers (the facts record the transfers used): receive buffers as
    :func:`receive_buffers`, and in backward passes those the gradient sums of one part of
    ``part_heads`` heads (:func:`backward_part_heads`) arrive in (``comm.sums_slots``)."""
    if problem.options["transfers"] == "nccl":
        return None
    why_not = peer_copy.unavailable(problem.device)
    # A fallback names the process group's backend that then carries the ring: NCCL, or gloo on CPUs.
    problem.facts["transfers"] = f"{dist.get_backend()}: {why_not}" if why_not else "copy-engine"
    if why_not:
        return None
    sums, group = None, ring_group()
    if problem.inputs.requires_grad:
        _, batch, heads, shard_len, dim = shape
        part = (2, batch, part_heads or blocks.backward_part_heads(batch, shard_len, heads), shard_len, dim)
        count, narrow = sums_slots(ring_size)
        dtype = blocks.gradient_dtype(kernel, problem.dtype) if narrow else torch.float32
        sums = peer_copy.PeerBuffers(part, count, dtype, problem.device, group)
    received = peer_copy.PeerBuffers(shape, _receive_buffer_count(ring_size), problem.dtype, problem.device, group)
    return peer_copy.RingPeers(received, sums)


def _world() -> dist.ProcessGroup:
    assert dist.group.WORLD is not None, "across processes there is a default group"
    return dist.group.WORLD


def _excludes(cell: Cell) -> str | None:
    assert cell.ring_size is not None, "ring shards the sequence: its cells have a ring size"
    kernel = dict(cell.options)["kernel"]
    if cell.pass_name != "forward" and kernel not in blocks.BACKWARD_KERNELS:
        return f"ring's backward runs on {', '.join(blocks.BACKWARD_KERNELS[1:])} blocks, not {kernel}"
    if dict(cell.options)["transfers"] == "copy-engine" and cell.world_size == 1:
        return "copy-engine transfers are between processes; one process has none"
    if dict(cell.options)["zigzag"] and cell.seq_len % (2 * cell.ring_size):
        return f"zigzag needs seq_len divisible by 2 × ring_size ({2 * cell.ring_size})"
    return None


def _memory_model(cell: Cell, facts: Mapping[str, Any]) -> int | None:
    return memory_model(cell, facts, ulysses_degree=1)


def memory_model(cell: Cell, facts: Mapping[str, Any], ulysses_degree: int) -> int | None:
    """Bytes a call allocates at its peak (see ``ringbench.attention.models``), per rank; N is one
    shard of one tensor. ``usp`` runs this ring on H/u heads of u times the rows (``ulysses_degree``
    u; 1 for ``ring``).

    Forward: the float32 accumulator (4 bytes per output element) and its log-sum-exp live
    throughout; on top of them come either one step's block output in the input dtype with
    its log-sum-exp, or, at the end, the output itself. A rank that merges in place
    (:func:`merges_in_place`) holds the first block's output and log-sum-exp, which become
    the output, and the second block's. On one device the blocks are views of
    the inputs, or with zigzag in a ring of more than one, of q, k and v copied in shard order
    (3 more elements per output element, freed before the output is made); across processes the
    figure is per rank, for its shard's rows.

    Forward+backward, with a fused kernel, across processes: the output (the call differentiates
    it) and its float32 log-sum-exp, and the gradients, allocated first (3N); then what one part of
    the backward holds at its peak (:func:`backward_part_peak`, in shares p of N, the part's heads'
    share; see ``blocks.backward_part_heads``) with the kernel's float32 row term. On one device, as
    a ring of one: the output, the float32 dQ sum (2N), a block's dq, dk and dv (3N), the float32
    dK and dV sums (4N) and the dk and dv they are stored in (2N), together 12N, with two float32
    per row. Rings of more than one on one device are not modelled.
    """
    element = DTYPE_BYTES[cell.dtype]
    if cell.pass_name == "forward":
        rows = cell.batch_size * cell.heads * cell.seq_len // cell.world_size
        if cell.world_size > 1 and merges_in_place(cell.world_size // ulysses_degree, element):
            return rows * cell.head_dim * 2 * element + 2 * row_floats(cell)
        in_shard_order = cell.world_size == 1 and (cell.ring_size or 1) > 1 and dict(cell.options)["zigzag"]
        return rows * cell.head_dim * (4 + element + (3 * element if in_shard_order else 0)) + 2 * row_floats(cell)
    if cell.pass_name != "forward+backward" or not fused_backward(facts):
        return None
    shard = shard_bytes(cell)
    if cell.world_size == 1:
        return 12 * shard + 2 * row_floats(cell) if cell.ring_size == 1 else None
    heads = cell.heads // ulysses_degree
    rows = cell.seq_len * ulysses_degree // cell.world_size
    part_heads = facts.get("backward_part_heads") or blocks.backward_part_heads(cell.batch_size, rows, heads)
    part_peak = backward_part_peak(
        cell.world_size // ulysses_degree, part_heads < heads, facts.get("transfers") == "copy-engine"
    )
    part_rows = row_floats(cell) * part_heads // heads
    return 4 * shard + part_peak * shard * part_heads // heads + row_floats(cell) + part_rows


def backward_part_peak(ring_size: int, several: bool, copy_engine: bool) -> int:
    """What a part of ``OneRank``'s backward holds at its peak, in shares p of one shard of one tensor
    (float32 counts 2p: the model is of 16-bit inputs). The largest of:

    - a block's kernel: the float32 dQ sum (2p), the rank's own dK and dV (2p), the block's dq, dk
      and dv (3p) and the kernel's float32 dQ accumulator (2p);
    - after a block, the gradient sums' hop (``comm.TravellingSums``): the dQ sum, the own dK and
      dV and the block's (2p each), then in a ring of two the hop's message (2p) and its arrival
      (2p); beyond two, the float32 sums made or arrived (4p) and the next float32 arrival (4p);
    - where the backward goes in several parts, a part's first block's kernel beside the part's K
      and V copied into one message (2p) and the previous part's own dK and dV (2p) and last
      arrival, not yet settled.

    A message in flight is freed once sent, before any of these. Copy-engine transfers receive
    into buffers kept from setup (:func:`setup_memory`)."""
    hop = 2 if ring_size == 2 else 4  # the blocks' dtype in a ring of two, float32 beyond
    arrival = 0 if copy_engine else hop
    kernel = 2 + 2 + 3 + 2
    after_hop = 2 + 2 + 2 + hop + arrival
    first_of_several = 2 + 2 + arrival + 3 + 2 if several else 0
    return max(kernel, after_hop, first_of_several)


def sums_buffer_bytes(cell: Cell, ulysses_degree: int, part_heads: int | None = None) -> int:
    """The buffers that receive the dK and dV sums of one part of ``part_heads`` heads (by default the
    fewest, ``blocks.backward_part_heads``) travelling a ring across processes with copy-engine
    transfers (``comm.sums_slots``); ``usp`` runs the ring on H/u heads of u times the rows."""
    rows = cell.seq_len * ulysses_degree // cell.world_size
    part_heads = part_heads or blocks.backward_part_heads(cell.batch_size, rows, cell.heads // ulysses_degree)
    count, narrow = sums_slots(cell.world_size // ulysses_degree)
    element = DTYPE_BYTES[cell.dtype] if narrow else 4
    return count * 2 * cell.batch_size * part_heads * rows * cell.head_dim * element


def setup_memory(cell: Cell, ulysses_degree: int = 1, *, part_heads: int | None = None) -> int:
    """The K/V receive buffers a rank of a ring across processes keeps (``receive_buffers``); one
    process keeps none, its blocks being views of the inputs. Copy-engine transfers of a backward
    pass in parts of ``part_heads`` heads (the fewest by default, as near the longest sequence) keep
    the buffers its gradient sums arrive in too (on ranks that fall back to NCCL, this overstates).
    ``usp`` runs this ring over P/u ranks (``ulysses_degree`` u). Transfers ``auto`` count as
    copy-engine transfers, which they are wherever the ranks allow them."""
    kept = receive_buffer_bytes(cell, cell.world_size // ulysses_degree)
    if cell.world_size > 1 and cell.pass_name != "forward" and dict(cell.options)["transfers"] != "nccl":
        kept += sums_buffer_bytes(cell, ulysses_degree, part_heads)
    return kept


@register(
    "ring",
    uses_ring=True,
    distributed=True,
    options={
        "kernel": Option("auto", choices=blocks.KERNELS, help="block kernel; auto picks the fastest that runs"),
        "zigzag": Option(False, help="shard r holds chunks r and 2P−1−r (balances causal work)"),
        "transfers": Option(
            "auto",
            choices=TRANSFERS,
            help="across processes: GPU copy engines within a host, NCCL point-to-point (gloo on CPUs),"
            " or auto: copy engines where the ranks allow them, else NCCL",
        ),
    },
    excludes=_excludes,
    memory_model=_memory_model,
    setup_memory=setup_memory,
    passes=PASSES,
    accumulates="float32",  # blocks merge, and gradients add up, in float32
    description="ring attention on one device: fused blocks with log-sum-exp, merged in float32",
)
def setup(problem: Problem) -> Bench:
    kernel = blocks.choose(problem.options["kernel"], problem.probe(1), backward=problem.inputs.requires_grad)
    problem.facts["kernel"] = kernel
    problem.facts["merge"] = blocks.merge_path(problem.device)
    if problem.world_size > 1:
        return _one_rank(problem, kernel, problem.options["zigzag"])
    return _all_ranks(problem, kernel, problem.options["zigzag"])
