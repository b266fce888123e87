"""PyTorch's own context parallelism (``torch.distributed.tensor.experimental.context_parallel``).

It is the peer baseline for ``ring`` across processes: inside the context, PyTorch
replaces ``scaled_dot_product_attention`` with a version that treats its inputs as
sequence shards of a device mesh and runs a ring of its own over them.

``context_parallel`` shards the buffers it is given in place and keeps, for as
long as it is open, what it needs to restore them. Handing it q, k and v would
keep their full size alive on every rank, so it gets a placeholder instead: a
(1, 1, S, 1) tensor of sequence positions. After sharding, the placeholder holds
exactly the positions this rank owns (for causal attention PyTorch reorders the
sequence head-tail to balance the work), and q, k and v are cut to those rows.
The context stays open from setup until the cell is done (``Bench.close``), so
only the attention call itself is timed.

PyTorch's CUDA kernels are the only ones it shards, so this runs on GPUs only. It
runs in one process too, as PyTorch's ring of one (its merge in float32 and all):
the baseline its longest sequence across processes is set against. A device mesh
needs a process group, so there the cell opens a group of this process alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringbench.attention.impls.sdpa import kernel_choice, resolved_backend
from ringbench.attention.models import forward_only, row_floats, shard_bytes
from ringbench.attention.registry import Bench, Option, Problem, register
from ringbench.vocabulary import PASSES, Cell

ROTATIONS = ("allgather", "alltoall")


def _excludes(cell: Cell) -> str | None:
    if cell.world_size == 1 and dict(cell.options)["rotate"] != ROTATIONS[0]:
        return f"in one process nothing rotates: torch-cp rotate={ROTATIONS[0]} runs the same"
    return None


def _memory_model(cell: Cell, facts: Mapping[str, Any]) -> int:
    """Bytes beyond the inputs at the peak of a forward call, per rank, in units of one sequence
    shard N (B·H·S·D/P elements), from PyTorch's ring (``_templated_ring_attention``).

    Across processes, first the K/V pairs (2N each) it holds: with ``allgather`` every rank's, P of
    them, gathered once; with ``alltoall`` the pair that arrived, and in a ring of three or more
    also the pair it sends on and the next one arriving, 3 of them. Then its merge of a block into
    the running output, all in float32: the running output (2N), the block's output (N) and its
    float32 copy (2N), and two float32 temporaries of the update (4N); with three float32
    log-sum-exps of the rows. In one process nothing rotates and there is nothing to merge: the
    block's output (N, held to the end), its float32 copy (2N) and the result cast back (N), with
    the block's log-sum-exp."""
    processes = cell.world_size
    if processes == 1:
        return 4 * shard_bytes(cell) + row_floats(cell)
    pairs = processes if dict(cell.options)["rotate"] == "allgather" else 1 if processes == 2 else 3
    return (pairs * 2 + 9) * shard_bytes(cell) + 3 * row_floats(cell)


@register(
    "torch-cp",
    distributed=True,
    options={
        "backend": Option(
            "auto",
            choices=("auto", "flash", "efficient", "cudnn"),
            help="SDPA kernel each block runs; auto lets PyTorch choose",
        ),
        "rotate": Option("allgather", choices=ROTATIONS, help="how K/V shards travel (PyTorch's set_rotate_method)"),
    },
    passes=PASSES,
    excludes=_excludes,
    memory_model=forward_only(_memory_model),
    description="PyTorch context parallel: torch.distributed.tensor.experimental.context_parallel",
)
def setup(problem: Problem) -> Bench:
    device = problem.device
    if device.type != "cuda":
        raise RuntimeError("torch-cp needs CUDA devices: PyTorch's context parallel shards only its CUDA SDPA kernels")
    # PyTorch exposes the rotation and load-balancing switches only in this private module.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import _cp_options, context_parallel, set_rotate_method

    backend, causal, seq_len = problem.options["backend"], problem.causal, problem.seq_len
    positions = torch.arange(seq_len, device=device).view(1, 1, seq_len, 1)
    with contextlib.ExitStack() as opened:  # closed here if anything below fails, else by Bench.close
        if not dist.is_initialized():  # one process, outside a launcher: a group of this process alone
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
            opened.callback(dist.destroy_process_group)
        mesh = init_device_mesh(device.type, (problem.world_size,))
        set_rotate_method(problem.options["rotate"])
        # PyTorch balances causal work by reordering the sequence head-tail (in 2P chunks),
        # and refuses that for non-causal attention; the switch is a module option.
        _cp_options.enable_load_balance = causal and seq_len % (2 * problem.world_size) == 0
        opened.enter_context(context_parallel(mesh, buffers=[positions], buffer_seq_dims=[2]))
        rows = positions.flatten()
        q, k, v = problem.shard(rows)
        problem.facts["kernel"] = resolved_backend(backend, q, k, v, causal)
        problem.facts["rotate"] = problem.options["rotate"]
        close = opened.pop_all().close

    def run() -> torch.Tensor:
        # F's attribute is looked up per call: while the context is open it is PyTorch's ring version.
        with kernel_choice(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return Bench(run=run, rows=rows, close=close, inputs=(q, k, v))
