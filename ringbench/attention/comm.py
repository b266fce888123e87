"""Transfers between ranks, what they send, and how long a rank waits for them.

Implementations post each ring step's transfer with :meth:`WaitClock.exchange`, and
each all-to-all with :meth:`WaitClock.all_to_all` (differentiably: :func:`post_all_to_all`),
and hand the requests to :meth:`WaitClock.wait` instead of waiting on them directly.
Normally that is all it does. In the worker's communication pass the clock is on
for one call: it adds up the bytes each transfer sends to other ranks (what stays on
the rank, a ring of one's copy or the block of an all-to-all a rank addresses to
itself, is not sent), and the time spent waiting: on the CPU the host time blocked
in ``wait()``; on a GPU, where ``wait()`` only makes the compute stream wait for the
transfer, a CUDA event before and after each wait, the time between them on the
stream being the stall.

Backward passes send gradient sums around the ring behind the K/V blocks they
belong to: :class:`TravellingSums`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


class WaitClock:
    def __init__(self, device: torch.device):
        self.device = device
        self.sent_bytes = 0
        self.transfers = 0
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
            self.transfers += 1
        return dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, send, send_to),
                dist.P2POp(dist.irecv, receive, receive_from),
            ]
        )

    def all_to_all(self, send: torch.Tensor, receive: torch.Tensor, group: dist.ProcessGroup | None = None) -> list:
        """Post an all-to-all among the ranks of ``group`` (the default group: every rank); returns the request.

        ``send`` and ``receive`` are cut along their first dimension into as many equal
        blocks as the group has ranks: block j of ``send`` goes to the group's j-th
        rank, block i of ``receive`` comes from its i-th. The block a rank addresses to
        itself stays on the rank, so it is not counted as sent.
        """
        if self._on:
            ranks = dist.get_world_size(group)
            self.sent_bytes += send.numel() * send.element_size() // ranks * (ranks - 1)
            self.transfers += 1
        return [dist.all_to_all_single(receive, send, group=group, async_op=True)]

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
        """One call of ``fn`` with the clock on: its time, the time spent waiting, the bytes sent to other
        ranks over the whole call, and the number of transfers that sent them."""
        self._on, self._cpu_ms, self._events, self.sent_bytes, self.transfers = True, 0.0, [], 0, 0
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
        return {
            "call_ms": call_ms,
            "wait_ms": wait_ms,
            "sent_bytes": float(self.sent_bytes),
            "transfers": self.transfers,
        }


@dataclass(frozen=True)
class InFlight:
    """An all-to-all posted through ``clock`` and not yet waited for: :meth:`arrived` waits and
    returns what it received."""

    received: torch.Tensor
    transfers: list
    clock: WaitClock

    def arrived(self) -> torch.Tensor:
        return _Arrived.apply(self.received, self.clock, self.transfers)


def post_all_to_all(send: torch.Tensor, clock: WaitClock, group: dist.ProcessGroup | None = None) -> InFlight:
    """Post :meth:`WaitClock.all_to_all` of ``send`` (contiguous), differentiably: the gradient of what
    arrives goes back by the same all-to-all, which undoes it (block i came from rank i, so its
    gradient goes to rank i). Work queued between posting and ``arrived()`` overlaps the transfer."""
    transfers: list = []
    return InFlight(_Posted.apply(send, clock, group, transfers), transfers, clock)


class _Posted(torch.autograd.Function):
    """Posts the all-to-all (its requests into ``transfers``) and returns the buffer it receives into."""

    @staticmethod
    def forward(ctx, send, clock, group, transfers):
        receive = torch.empty_like(send)
        transfers.extend(clock.all_to_all(send, receive, group))
        ctx.clock, ctx.group = clock, group
        return receive

    @staticmethod
    def backward(ctx, grad_received):
        # The backward pass waits at once: autograd gives no later point to wait at.
        grad_received = grad_received.contiguous()  # and so, made like it, the buffer it lands in
        grad_send = torch.empty_like(grad_received)
        ctx.clock.wait(ctx.clock.all_to_all(grad_received, grad_send, ctx.group))
        return grad_send, None, None, None


class _Arrived(torch.autograd.Function):
    """Waits for the all-to-all that fills ``received``; to gradients, the identity."""

    @staticmethod
    def forward(ctx, received, clock, transfers):
        clock.wait(transfers)
        return received

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


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
