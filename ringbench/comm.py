"""Point-to-point transfers between ranks, and how long a rank waits for them.

Implementations post each ring step's transfer with :meth:`WaitClock.exchange` and
hand the requests to :meth:`WaitClock.wait` instead of waiting on them directly. Normally that is all it does. In the worker's
communication pass the clock is on for one call: on the CPU it adds up the host
time spent blocked in ``wait()``; on a GPU, where ``wait()`` only makes the compute
stream wait for the transfer, it records a CUDA event before and after each wait,
and the time between them on the stream is the stall.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

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
        deadlock that separately issued blocking sends would risk.
        """
        if self._on:
            self.sent_bytes += send.numel() * send.element_size()
            self.sends += 1
        return dist.batch_isend_irecv([
            dist.P2POp(dist.isend, send, send_to), dist.P2POp(dist.irecv, receive, receive_from),
        ])

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
