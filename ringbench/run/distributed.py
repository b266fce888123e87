"""Process groups: the ranks that run a cell together, and how they agree.

A cell runs on a group. In one process that is :class:`OneProcess`, where
gathering, the maximum and barriers are trivial, so that a single-process cell and
a multi-process one run the same phase code. Across processes it is
:class:`ProcessGroup`, joined from the launcher's environment: ringbench never
opens sockets itself, the ranks of a world size are started by PyTorch's launcher
(``torch.distributed.run``, i.e. torchrun), which sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address. NCCL serves CUDA devices, gloo the CPU.
Every wait is bounded by the group's timeout, which follows the sweep's
``cell_timeout_s`` (:func:`group_timeout`).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# A wait in the group may last this much longer than a cell may run. The supervisor stops a cell
# that runs past cell_timeout_s and records it as `timeout` with its worker's output; the group's
# own timeout (NCCL's watchdog) only backs that up, and never ends a cell the config allows.
GROUP_TIMEOUT_GRACE_S = 60.0


# How long ranks that failed wait at an agreement for the others before taking them for stuck: a
# rank waiting on a transfer its failed peer will never make never arrives. Ranks in step arrive
# within milliseconds of each other; one that lags this far behind a failure is ended with it.
STUCK_AFTER_S = 10.0


class PeersStuck(Exception):
    """Some rank failed, and others did not reach the agreement within ``STUCK_AFTER_S``."""

    def __init__(self, arrived: dict[int, Any], missing: list[int], recorder: bool):
        super().__init__(f"rank(s) {', '.join(map(str, missing))} did not reach the agreement")
        self.arrived = arrived  # rank → its value, for the ranks that did
        self.missing = missing
        self.recorder = recorder  # whether this rank, of those that arrived, records the cell


def group_timeout(cell_timeout_s: float) -> timedelta:
    """The process group's timeout for a sweep whose cells may run ``cell_timeout_s`` seconds."""
    return timedelta(seconds=cell_timeout_s + GROUP_TIMEOUT_GRACE_S)


@dataclass(frozen=True)
class OneProcess:
    """A group of one: this process alone, on ``device``."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        return [value]

    def gather_failures(self, failure: Any) -> list[Any]:
        """Every rank's ``failure`` (plain JSON data; None where it is fine), in rank order, on every
        rank, through a path that no stuck transfer blocks; see :meth:`ProcessGroup.gather_failures`."""
        return [failure]

    def max(self, value: float) -> float:
        """The largest of every rank's ``value``, on every rank."""
        return value

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return value

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def leave(self) -> None:
        """Leave the group (after the last cell)."""


@dataclass(frozen=True)
class ProcessGroup(OneProcess):
    """This process's place in the group a launcher started: the same operations, across ranks."""

    rounds: Iterator[int] = field(default_factory=itertools.count, compare=False, repr=False)

    def gather_failures(self, failure: Any) -> list[Any]:
        """Through the launcher's key-value store rather than the group's transfers: a rank whose
        peer failed may be waiting on a transfer that peer will never make, and a collective queued
        behind it would never finish. Once a rank that arrived reports a failure, the ranks here wait
        for the rest ``STUCK_AFTER_S`` at most, then raise :class:`PeersStuck` (one of them marked to
        record the cell); where none does, they wait as long as it takes (the cell's timeout bounds it)."""
        store = dist.distributed_c10d._get_default_store()
        prefix = f"ringbench/agree/{next(self.rounds)}/"
        store.set(f"{prefix}{self.rank}", json.dumps(failure))
        keys = [f"{prefix}{rank}" for rank in range(self.world_size)]
        failed_at = None
        while True:
            present = [rank for rank, key in enumerate(keys) if store.check([key])]
            arrived = {rank: json.loads(store.get(keys[rank])) for rank in present}
            if len(arrived) == self.world_size:
                return [arrived[rank] for rank in range(self.world_size)]
            if any(value is not None for value in arrived.values()):
                failed_at = failed_at or time.monotonic()
                if time.monotonic() - failed_at > STUCK_AFTER_S:
                    missing = [rank for rank in range(self.world_size) if rank not in arrived]
                    raise PeersStuck(arrived, missing, recorder=store.add(f"{prefix}recorder", 1) == 1)
            time.sleep(0.005)

    def gather(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """Whether this process was started by a launcher as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_world_size() -> int:
    """Ranks on this host (the launcher's LOCAL_WORLD_SIZE; 1 outside a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def join(device: torch.device, timeout: timedelta) -> OneProcess:
    """This process's group: the one the launcher prepared (one CUDA device per local rank), every
    wait in it bounded by ``timeout``; or, outside a launcher, this process alone on ``device``."""
    if not launched():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return OneProcess(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return ProcessGroup(device, dist.get_rank(), dist.get_world_size())
