"""DeepSpeed-Ulysses: sequence shards in, head shards for attention, sequence shards out.

Each of P ranks holds a contiguous 1/P of the sequence for every head. An
all-to-all per tensor turns that into every position for H/P heads; each rank
runs full-sequence attention (SDPA with the configured kernel, causal natively)
on its heads; one more all-to-all turns the output back into the rank's sequence
shard. The all-to-alls are differentiable, so backward passes send the gradients
back the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from ringbench.attention.impls.sdpa import kernel_choice, resolved_backend
from ringbench.attention.registry import Bench, Option, Problem, register
from ringbench.vocabulary import PASSES, Cell


def _excludes(cell: Cell) -> str | None:
    if cell.world_size == 1:
        return "ulysses runs across processes only (in one process it is sdpa)"
    if cell.heads % cell.world_size:
        return f"ulysses needs heads divisible by the world size ({cell.heads} heads, {cell.world_size} processes)"
    if cell.seq_len % cell.world_size:
        return f"seq_len {cell.seq_len} is not divisible by the world size {cell.world_size}"
    return None


def to_heads(x: torch.Tensor, processes: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(B, H, S/P, D) sequence shard → (B, H/P, S, D) head shard, through one all-to-all
    among the ``processes`` ranks of ``group`` (the default group: every rank)."""
    batch, heads, shard, dim = x.shape
    # (P, B, H/P, S/P, D): block j goes to rank j, which owns heads j·H/P … (j+1)·H/P.
    outgoing = x.reshape(batch, processes, heads // processes, shard, dim).transpose(0, 1).contiguous()
    incoming = dist_nn.all_to_all_single(torch.empty_like(outgoing), outgoing, group=group)
    # Block i came from rank i: sequence chunk i of this rank's heads.
    return incoming.permute(1, 2, 0, 3, 4).reshape(batch, heads // processes, processes * shard, dim)


def to_sequence(x: torch.Tensor, processes: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(B, H/P, S, D) head shard → (B, H, S/P, D) sequence shard: ``to_heads`` undone."""
    batch, heads_here, seq_len, dim = x.shape
    shard = seq_len // processes
    # (P, B, H/P, S/P, D): sequence chunk j goes back to rank j.
    outgoing = x.reshape(batch, heads_here, processes, shard, dim).permute(2, 0, 1, 3, 4).contiguous()
    incoming = dist_nn.all_to_all_single(torch.empty_like(outgoing), outgoing, group=group)
    # Block i came from rank i: heads i·H/P … of this rank's sequence chunk.
    return incoming.transpose(0, 1).reshape(batch, processes * heads_here, shard, dim)


@register(
    "ulysses",
    distributed=True,
    options={
        "backend": Option(
            "auto",
            choices=("auto", "flash", "efficient", "cudnn", "math"),
            help="SDPA kernel of the full-sequence attention on each rank's heads",
        )
    },
    passes=PASSES,
    excludes=_excludes,
    description="DeepSpeed-Ulysses: all-to-all from sequence to head shards, SDPA on H/P heads, all-to-all back",
)
def setup(problem: Problem) -> Bench:
    backend, causal, processes = problem.options["backend"], problem.causal, problem.world_size
    seq_len = problem.seq_len
    shard = seq_len // processes
    rows = torch.arange(problem.rank * shard, (problem.rank + 1) * shard, device=problem.device)
    q, k, v = problem.shard(rows)
    # The kernel SDPA picks for what each rank attends: H/P heads, the whole sequence.
    probe = problem.probe(seq_len, q.shape[1] // processes)
    problem.facts["kernel"] = resolved_backend(backend, probe, probe, probe, causal)

    def run() -> torch.Tensor:
        heads_q, heads_k, heads_v = (to_heads(t, processes) for t in (q, k, v))
        with kernel_choice(backend):
            out = F.scaled_dot_product_attention(heads_q, heads_k, heads_v, is_causal=causal)
        return to_sequence(out, processes)

    return Bench(run=run, rows=rows, inputs=(q, k, v))
