"""Unified sequence parallelism: Ulysses within groups of ranks, a ring across them.

As in the long-context-attention (yunchang) project, the P processes form a grid of
u × r: global rank = ring index × u + Ulysses index, so the u ranks of a Ulysses
group are contiguous. Each ring shard of the sequence (``ring.positions``: with
``zigzag``, chunks i and 2r−1−i for ring index i) is split contiguously among
the u ranks of its Ulysses group. An all-to-all within the group turns each
rank's rows into the whole ring shard for H/u heads; the ranks sharing a Ulysses
index then run ring attention over the r shards (``ring.OneRank``, K/V between
processes by copy engines or point-to-point ops, as ``ring``'s ``transfers``); one
more all-to-all turns the output back into the rank's rows for every head. Both
all-to-alls and the ring are differentiable, and all of them go through the worker's
clock.

Degree 1 is ``ring`` across processes; degree P, a ring of one, is ``ulysses``
itself (:class:`ulysses.UlyssesAttention`, its own rows first in causal attention as by
``ulysses``' default) with the ring's block kernel for SDPA.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ringbench.attention import blocks
from ringbench.attention.impls import ring, ulysses
from ringbench.attention.impls.ring import OneRank, positions, receive_buffers
from ringbench.attention.impls.ulysses import to_heads, to_sequence
from ringbench.attention.models import shard_bytes
from ringbench.attention.registry import Bench, Option, Problem, register
from ringbench.vocabulary import PASSES, Cell

# The process groups of this process, by (kind, world size, degree). Every rank must create
# every group, in the same order, so they are made once per process (a worker joins its
# process group once) rather than once per cell. A rank outside a group holds PyTorch's
# placeholder for it (GroupMember.NON_GROUP_MEMBER) in its place.
_GROUPS: dict[tuple[str, int, int], list[Any]] = {}


def _own_group(kind: str, world_size: int, degree: int, index: int) -> dist.ProcessGroup:
    """Group ``index`` of a kind, this rank being one of its members. ``ulysses``: by ring index,
    the ``degree`` contiguous ranks that share it. ``ring``: by Ulysses index, the ranks ``degree``
    apart that share it, made only for copy-engine transfers, whose symmetric memory it names;
    gloo groups, as nothing is sent over them."""
    if (kind, world_size, degree) not in _GROUPS:
        if kind == "ulysses":
            members = [list(range(index * degree, (index + 1) * degree)) for index in range(world_size // degree)]
        else:
            members = [list(range(index, world_size, degree)) for index in range(degree)]
        backend = None if kind == "ulysses" else "gloo"
        _GROUPS[kind, world_size, degree] = [dist.new_group(ranks, backend=backend) for ranks in members]
    group = _GROUPS[kind, world_size, degree][index]
    assert isinstance(group, dist.ProcessGroup), "a rank selects only a group it belongs to"
    return group


def _check_options(options: Mapping[str, Any]) -> str | None:
    if options["ulysses_degree"] < 1:
        return f"ulysses_degree must be at least 1 (got {options['ulysses_degree']})"
    return None


def _excludes(cell: Cell) -> str | None:
    options = dict(cell.options)
    degree, processes, zigzag = options["ulysses_degree"], cell.world_size, options["zigzag"]
    if processes == 1:
        return "usp runs across processes only"
    if processes % degree:
        return f"usp needs the world size divisible by ulysses_degree ({processes} processes, degree {degree})"
    if cell.heads % degree:
        return f"usp needs heads divisible by ulysses_degree ({cell.heads} heads, degree {degree})"
    chunks = processes * (2 if zigzag else 1)
    if cell.seq_len % chunks:
        return f"seq_len {cell.seq_len} is not divisible by {'2 × ' if zigzag else ''}the world size ({chunks})"
    if cell.pass_name != "forward" and options["kernel"] not in blocks.BACKWARD_KERNELS:
        kernel = options["kernel"]
        return f"usp's backward runs on {', '.join(blocks.BACKWARD_KERNELS[1:])} blocks, not {kernel}"
    if options["transfers"] == "copy-engine" and degree == processes:
        return "at ulysses_degree P there is no ring: copy-engine transfers have nothing to carry"
    return None


def _memory_model(cell: Cell, facts: Mapping[str, Any]) -> int | None:
    """Bytes a call allocates at its peak (see ``ringbench.attention.models``), per rank. At degree P,
    Ulysses alone, ``ulysses``'. Otherwise the ring's (its shard has as many rows, B·H/u heads ×
    S·u/P positions, as a ring of P has per rank) and, with u > 1, the q, k and v head shards the
    ring runs on (3N, as many bytes as the rank's q, k and v), and in forward+backward also the
    output the call differentiates and its gradient in head shards (2N)."""
    degree = dict(cell.options)["ulysses_degree"]
    if degree == cell.world_size:
        return ulysses.memory_model(cell, facts, chunks=1, own_rows_first=cell.causal)
    ring_bytes = ring.memory_model(cell, facts, degree)
    if ring_bytes is None or degree == 1:
        return ring_bytes
    return ring_bytes + (3 if cell.pass_name == "forward" else 5) * shard_bytes(cell)


def _setup_memory(cell: Cell, *, part_heads: int | None = None) -> int:
    """The ring's, as ``ring.setup_memory`` says: its K/V receive buffers, each K and V of H/u heads
    of a ring shard (2N), one per transfer up to two (none in a ring of one), and with copy-engine
    transfers in a backward pass its travelling sums, of parts of ``part_heads`` heads."""
    return ring.setup_memory(cell, dict(cell.options)["ulysses_degree"], part_heads=part_heads)


@register(
    "usp",
    distributed=True,
    options={
        "ulysses_degree": Option(1, help="ranks per Ulysses group (u); the ring spans P / u of them", short="u"),
        "kernel": Option("auto", choices=blocks.KERNELS, help="block kernel of the ring, as ring's"),
        "zigzag": Option(False, help="the ring's shards as ring's zigzag: ring shard i holds chunks i and 2r−1−i"),
        "transfers": Option("auto", choices=ring.TRANSFERS, help="the ring's transfers, as ring's"),
    },
    passes=PASSES,
    excludes=_excludes,
    check_options=_check_options,
    memory_model=_memory_model,
    setup_memory=_setup_memory,
    accumulates="float32",  # the ring's blocks merge, and its gradients add up, in float32
    description="Ulysses × ring: all-to-all to H/u heads within groups of u ranks, ring attention across P/u groups",
)
def setup(problem: Problem) -> Bench:
    assert problem.comm is not None, "across processes the worker hands setup a clock"
    kernel = blocks.choose(problem.options["kernel"], problem.probe(1), backward=problem.inputs.requires_grad)
    problem.facts["kernel"] = kernel
    problem.facts["merge"] = blocks.merge_path(problem.device)
    degree, zigzag, comm = problem.options["ulysses_degree"], problem.options["zigzag"], problem.comm
    ring_size = problem.world_size // degree
    ring_index, ulysses_index = divmod(problem.rank, degree)
    group = _own_group("ulysses", problem.world_size, degree, ring_index) if degree > 1 else None
    # The ring shard's positions, in its order; this rank holds the Ulysses index-th contiguous part.
    shard = positions(problem.seq_len, ring_size, zigzag, problem.device)[ring_index]
    rows = shard.view(degree, -1)[ulysses_index]
    q, k, v = problem.shard(rows)

    def ring_group() -> dist.ProcessGroup:  # the ranks of this rank's ring, for copy-engine transfers
        return _own_group("ring", problem.world_size, degree, ulysses_index)

    # This rank's place in its ring, for the ring built once (degree 1) or on each call's head shards.
    part_heads = (
        ring.backward_part_heads(problem, q.shape[1] // degree, q.shape[2] * degree, _memory_model, _setup_memory)
        if ring_size > 1
        else None
    )
    ring_rank = functools.partial(
        OneRank,
        causal=problem.causal,
        kernel=kernel,
        zigzag=zigzag,
        comm=comm,
        rank=ring_index,
        ring_size=ring_size,
        send_to=(ring_index + 1) % ring_size * degree + ulysses_index,
        receive_from=(ring_index - 1) % ring_size * degree + ulysses_index,
        part_heads=part_heads,
    )
    if degree == 1:  # ring across processes, built as ring builds it
        # K and V stacked once into the message each ring step sends; k and v become leaves viewing it.
        kv = torch.stack([k.detach(), v.detach()])
        k, v = (part.requires_grad_(q.requires_grad) for part in kv.unbind())
        peers = ring.ring_peers(problem, kv.shape, ring_size, kernel, ring_group, part_heads)
        received = peers.kv.slots if peers else receive_buffers(kv.shape, kv, ring_size)
        one_rank = ring_rank(q, kv, received=received, peers=peers)
        inputs = (q, k, v)
        return Bench(run=lambda: blocks.Differentiable.apply(*inputs, one_rank), rows=rows, inputs=inputs)

    if ring_size == 1:  # Ulysses alone

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return blocks.attend(kernel, q, k, v, problem.causal)[0]

        attention = ulysses.UlyssesAttention(q, k, v, problem.causal, 1, problem.causal, kernel, attend, comm, group)
        return Bench(run=lambda: blocks.Differentiable.apply(q, k, v, attention), rows=rows, inputs=(q, k, v))

    batch, heads, shard_rows, dim = q.shape
    message = (2, batch, heads // degree, shard_rows * degree, dim)
    peers = ring.ring_peers(problem, message, ring_size, kernel, ring_group, part_heads)
    received = peers.kv.slots if peers else receive_buffers(message, q, ring_size)

    def run() -> torch.Tensor:
        # One all-to-all to the ring shard's rows (gathered in Ulysses index order, the shard's) for H/u
        # heads; K and V arrive stacked, the one message each ring step sends.
        (arrived,) = to_heads((q, k, v), comm, group).arrived()
        one_rank = ring_rank(arrived[0], arrived[1:], received=received, peers=peers)
        out = blocks.Differentiable.apply(*arrived.unbind(), one_rank)
        return to_sequence(out, comm, group)

    return Bench(run=run, rows=rows, inputs=(q, k, v))
