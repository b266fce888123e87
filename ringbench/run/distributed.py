"""Process groups: joining the one a launcher started, and agreeing across its ranks.

ringbench never opens sockets itself: the ranks of a world size are started by
PyTorch's launcher (``torch.distributed.run``, i.e. torchrun), which sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address. NCCL serves CUDA devices, gloo
the CPU. Every wait is bounded by the group's timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Group:
    """This process's place in the running group."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by a launcher as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_world_size() -> int:
    """Ranks on this host (the launcher's LOCAL_WORLD_SIZE; 1 outside a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def join(device_type: str, timeout: timedelta = TIMEOUT) -> Group:
    """Join the process group the launcher prepared; one CUDA device per local rank."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def max_over_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    dist.barrier()
