"""DeepSpeed-Ulysses: sequence shards in, head shards for attention, sequence shards out.

Each of P ranks holds a contiguous 1/P of the sequence for every head. An
all-to-all turns that into every position for H/P heads; each rank runs
full-sequence attention (SDPA with the configured kernel, causal natively) on its
heads; one more all-to-all turns the output back into the rank's sequence shard.

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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringbench.attention.comm import InFlight, WaitClock, post_all_to_all
from ringbench.attention.impls.sdpa import kernel_choice, resolved_backend
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


def _check_options(options: Mapping[str, Any]) -> str | None:
    if options["chunks"] < 1:
        return f"chunks must be at least 1 (got {options['chunks']})"
    return None


def send_to_heads(
    tensors: Sequence[torch.Tensor], processes: int, clock: WaitClock, group: dist.ProcessGroup | None = None
) -> InFlight:
    """Post the all-to-all, among the ``processes`` ranks of ``group`` (the default group: every rank),
    that turns each of ``tensors``, a (B, H, S/P, D) sequence shard, into a (B, H/P, S, D) head shard;
    all of them go in one all-to-all. :func:`as_heads` waits for it."""
    batch, heads, shard, dim = tensors[0].shape
    # (P, T, B, H/P, S/P, D), in one copy: block j goes to rank j, which owns heads j·H/P … (j+1)·H/P.
    send = torch.stack(
        [t.reshape(batch, processes, heads // processes, shard, dim).transpose(0, 1) for t in tensors], dim=1
    )
    return post_all_to_all(send, clock, group)


def as_heads(in_flight: InFlight) -> torch.Tensor:
    """(T, B, H/P, S, D): the head shards :func:`send_to_heads` posted, once arrived (one copy)."""
    received = in_flight.arrived()
    processes, count, batch, heads_here, shard, dim = received.shape
    # Block i came from rank i: sequence chunk i of this rank's heads.
    return received.permute(1, 2, 3, 0, 4, 5).reshape(count, batch, heads_here, processes * shard, dim)


def send_to_sequence(
    x: torch.Tensor, processes: int, clock: WaitClock, group: dist.ProcessGroup | None = None
) -> InFlight:
    """Post the all-to-all that turns a (B, H/P, S, D) head shard back into a (B, H, S/P, D) sequence
    shard: :func:`send_to_heads` undone. :func:`as_sequence` waits for it."""
    batch, heads_here, seq_len, dim = x.shape
    # (P, B, H/P, S/P, D): sequence chunk j goes back to rank j.
    send = x.reshape(batch, heads_here, processes, seq_len // processes, dim).permute(2, 0, 1, 3, 4).contiguous()
    return post_all_to_all(send, clock, group)


def as_sequence(in_flights: Sequence[InFlight]) -> torch.Tensor:
    """(B, H, S/P, D): this rank's sequence shard of every head, from the head shards of consecutive
    chunks of heads posted by :func:`send_to_sequence`, once arrived (one copy)."""
    # Each is (P, B, H/(cP), S/P, D), block i from rank i: heads i·H/(cP) … of its chunk.
    return torch.cat([in_flight.arrived().transpose(0, 1) for in_flight in in_flights], dim=1).flatten(1, 2)


@register(
    "ulysses",
    distributed=True,
    options={
        "backend": Option(
            "auto",
            choices=("auto", "flash", "efficient", "cudnn", "math"),
            help="SDPA kernel of the full-sequence attention on each rank's heads",
        ),
        # Plain by default: on two H200s (NVLink) two and four pipelined chunks were slower
        # than one in every cell, by 0.4-4% (results/evidence/20261128T135506Z-9ee181d8): splitting the
        # attention costs more than the exposed all-to-all it hides. On four, two chunks won 2.2% in
        # non-causal forward and were within 0.7% elsewhere (20261128T140520Z-9f1d9cc1).
        "chunks": Option(
            1,
            help="chunks of heads, pipelined: the next chunk's all-to-all and the last one's output's overlap "
            "this chunk's attention; 1 is the plain form",
        ),
    },
    passes=PASSES,
    excludes=_excludes,
    check_options=_check_options,
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
        return send_to_heads([t[:, heads] for t in (q, k, v)], processes, clock)

    def run() -> torch.Tensor:
        inbound, outbound = send_chunk(0), []
        for chunk in range(chunks):
            arriving = inbound
            if chunk + 1 < chunks:  # on its way while this chunk is attended
                inbound = send_chunk(chunk + 1)
            heads_q, heads_k, heads_v = as_heads(arriving).unbind()
            with kernel_choice(backend):
                out = F.scaled_dot_product_attention(heads_q, heads_k, heads_v, is_causal=causal)
            outbound.append(send_to_sequence(out, processes, clock))  # back during the next chunk's attention
        return as_sequence(outbound)

    return Bench(run=run, rows=rows, inputs=(q, k, v))
