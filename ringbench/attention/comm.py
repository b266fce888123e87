"""Point-to-point transfers between ranks, and how long a rank waits for them.

Implementations post each ring step's transfer with :meth:`WaitClock.exchange` and
hand the requests to :meth:`WaitClock.wait` instead of waiting on them directly.
Normally that is all it does. In the worker's communication pass the clock is on
for one call: on the CPU it adds up the host time spent blocked in ``wait()``; on
a GPU, where ``wait()`` only makes the compute stream wait for the transfer, it
records a CUDA event before and after each wait, and the time between them on the
stream is the stall.

Backward passes send gradient sums around the ring behind the K/V blocks they
belong to: :class:`TravellingSums`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


class WaitClock:
    def __init__(self, device: torch.device):
        self.device = device
        self.sent_bytes = 0
        self.sends = 0
        self._on = False
        self._cpu_ms = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def exchange(self, send: torch.Tensor, receive: torch.Tensor, send_to: int, receive_from: int) -> list:
        """Post one ring step's transfer, sending ``send`` and receiving into ``receive``; returns the requests.

        Sends and receives go in one batch: NCCL then pairs them up without the
        deadlock that separately issued blocking sends would risk. A rank that is its
        own neighbour (a ring of one) sends nothing: the message is copied.
        """
        if send_to == receive_from == dist.get_rank():
            receive.copy_(send)
            return []
        if self._on:
            self.sent_bytes += send.numel() * send.element_size()
            self.sends += 1
        return dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, send, send_to),
                dist.P2POp(dist.irecv, receive, receive_from),
            ]
        )

    def wait(self, transfers: Sequence) -> None:
        if not self._on:
            for transfer in transfers:
                transfer.wait()
            return
        if self.device.type == "cuda":
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
            for transfer in transfers:
                transfer.wait()
            after.record()
            self._events.append((before, after))
        else:
            start = time.perf_counter_ns()
            for transfer in transfers:
                transfer.wait()
            self._cpu_ms += (time.perf_counter_ns() - start) / 1e6

    def measure(self, fn: Callable[[], object]) -> dict[str, float]:
        """One call of ``fn`` with the clock on: its time, the time spent waiting, what was sent."""
        self._on, self._cpu_ms, self._events, self.sent_bytes, self.sends = True, 0.0, [], 0, 0
        try:
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                call_ms = start.elapsed_time(end)
                wait_ms = sum(before.elapsed_time(after) for before, after in self._events)
            else:
                begin = time.perf_counter_ns()
                fn()
                call_ms = (time.perf_counter_ns() - begin) / 1e6
                wait_ms = self._cpu_ms
        finally:
            self._on = False
        return {"call_ms": call_ms, "wait_ms": wait_ms, "sent_bytes": float(self.sent_bytes), "sends": self.sends}


class TravellingSums:
    """Float32 gradient sums that travel a ring one step behind the K/V block they belong to.

    In step t a rank holds some K/V block and, from step 1 on, receives from its
    neighbour that block's sums so far (``held``); it adds its share and passes them
    on (``pass_on``), which overlaps the next step's compute. After as many steps as
    the ring has ranks, each block's sums are back at its owner, complete (``own``).
    """

    def __init__(self, clock: WaitClock, shape: torch.Size, device: torch.device, send_to: int, receive_from: int):
        self.clock, self.send_to, self.receive_from = clock, send_to, receive_from
        self.sums = torch.zeros(shape, dtype=torch.float32, device=device)
        self.spare = torch.empty_like(self.sums)
        self.transfers: list = []

    def held(self, step: int) -> torch.Tensor:
        """The sums of the block held in ``step`` (waited for from the neighbour after step 0)."""
        if step > 0:
            self.clock.wait(self.transfers)
            self.sums, self.spare = self.spare, self.sums
        return self.sums

    def pass_on(self) -> None:
        self.transfers = self.clock.exchange(self.sums, self.spare, self.send_to, self.receive_from)

    def own(self) -> torch.Tensor:
        """After the last ``pass_on``: this rank's own block's sums, over every rank."""
        self.clock.wait(self.transfers)
        return self.spare
