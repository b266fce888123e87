"""Transfers between ranks, what they send, and how long a rank waits for them.

Implementations post each ring step's transfer with :meth:`WaitClock.exchange`, and
each all-to-all with :meth:`WaitClock.swap` (differentiably: :func:`post_swap`), and
hand the requests to :meth:`WaitClock.wait` instead of waiting on them directly.
An all-to-all goes as point-to-point pieces rather than NCCL's all-to-all, so that
every piece lands where the receiver computes on it: no copy on either side.
Normally that is all it does. In the worker's communication pass the clock is on
for one call: it adds up the bytes each transfer sends to other ranks (what stays on
the rank, a ring of one's copy or the pieces of an all-to-all a rank keeps, is not
sent), and the time spent waiting: on the CPU the host time blocked
in ``wait()``; on a GPU, where ``wait()`` only makes the compute stream wait for the
transfer, a CUDA event before and after each wait, the time between them on the
stream being the stall.

Backward passes send gradient sums around the ring behind the K/V blocks they
belong to: :class:`TravellingSums`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from ringbench.attention.peer_copy import PeerBuffers

# (what this rank sends, the tensor that receives its counterpart, the rank on the other side)
Piece = tuple[torch.Tensor, torch.Tensor, int]


class WaitClock:
    def __init__(self, device: torch.device):
        self.device = device
        self.sent_bytes = 0
        self.transfers = 0
        self._on = False
        self._cpu_ms = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def exchange(
        self,
        send: torch.Tensor,
        receive: torch.Tensor,
        send_to: int,
        receive_from: int,
        through: PeerBuffers | None = None,
    ) -> list:
        """Post one ring step's transfer, sending ``send`` and receiving into ``receive``; returns the requests.

        Sends and receives go in one batch: NCCL then pairs them up without the
        deadlock that separately issued blocking sends would risk. With ``through``,
        whose buffers ``receive`` lies in, the copy engine writes the message instead
        (``ringbench.attention.peer_copy``). A rank that is its own neighbour (a ring
        of one) sends nothing: the message is copied.
        """
        if send_to == receive_from == dist.get_rank():
            receive.copy_(send)
            return []
        if self._on:
            self.sent_bytes += send.numel() * send.element_size()
            self.transfers += 1
        if through is not None:
            return through.post(send, receive, send_to, receive_from)
        return dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, send, send_to),
                dist.P2POp(dist.irecv, receive, receive_from),
            ]
        )

    def swap(self, pieces: Iterable[Piece]) -> list:
        """Post, for each (send, receive, peer) of ``pieces``, a send of ``send`` to rank ``peer`` and a
        receive into ``receive`` from it, all in one batch; returns the requests.

        Between two ranks the pieces pair up in the order posted, so each side lists what it
        exchanges with the other in the same order. A piece whose peer is this rank is copied
        (and not counted as sent), after the batch is posted, so that on a GPU the copy overlaps
        the transfer. Pieces are contiguous, as NCCL sends only contiguous memory.
        """
        me, operations, kept = dist.get_rank(), [], []
        for send, receive, peer in pieces:
            if peer == me:
                kept.append((send, receive))
                continue
            if self._on:
                self.sent_bytes += send.numel() * send.element_size()
            operations += [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, receive, peer)]
        if self._on:
            self.transfers += 1
        requests = dist.batch_isend_irecv(operations) if operations else []
        for send, receive in kept:
            receive.copy_(send)
        return requests

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

    received: tuple[torch.Tensor, ...]
    transfers: list
    clock: WaitClock

    def arrived(self) -> tuple[torch.Tensor, ...]:
        return _Arrived.apply(self.clock, self.transfers, *self.received)


class Layout(Protocol):
    """How tensors are cut into the pieces :meth:`WaitClock.swap` exchanges, and what receives them."""

    def targets(self, sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Empty tensors for what arrives in exchange for ``sources``."""
        ...

    def pieces(self, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> Iterable[Piece]:
        """(a piece of ``sources`` to send, the piece of ``targets`` that receives its counterpart, the peer)."""
        ...


def post_swap(sources: Sequence[torch.Tensor], layout: Layout, clock: WaitClock) -> InFlight:
    """Post :meth:`WaitClock.swap` of ``sources`` cut as ``layout`` says, differentiably: each piece's
    gradient goes back to where the piece came from, by the same exchange the other way round. Work
    queued between posting and ``arrived()`` overlaps the transfer."""
    transfers: list = []
    return InFlight(_Posted.apply(layout, clock, transfers, *sources), transfers, clock)


class _Posted(torch.autograd.Function):
    """Posts the swap (its requests into ``transfers``) and returns the tensors it receives into."""

    @staticmethod
    def forward(ctx, layout, clock, transfers, *sources):
        targets = layout.targets(sources)
        transfers.extend(clock.swap(layout.pieces(sources, targets)))
        ctx.layout, ctx.clock = layout, clock
        ctx.sources = [(source.shape, source.dtype, source.device) for source in sources]
        return tuple(targets)

    @staticmethod
    def backward(ctx, *grad_targets):
        # The backward pass waits at once: autograd gives no later point to wait at.
        grad_targets = [grad.contiguous() for grad in grad_targets]  # pieces are views: contiguous rows
        grad_sources = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.sources]
        back = ((receive, send, peer) for send, receive, peer in ctx.layout.pieces(grad_sources, grad_targets))
        ctx.clock.wait(ctx.clock.swap(back))
        return (None, None, None, *grad_sources)


class _Arrived(torch.autograd.Function):
    """Waits for the all-to-all that fills ``received``; to gradients, the identity."""

    @staticmethod
    def forward(ctx, clock, transfers, *received):
        clock.wait(transfers)
        return received

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *grads)


class TravellingSums:
    """Float32 gradient sums that travel a ring one step behind the K/V block they belong to.

    In step t a rank holds some K/V block and, from step 1 on, receives from its
    neighbour that block's sums so far (``held``); it adds its share and passes them
    on (``pass_on``), which overlaps the next step's compute. After as many steps as
    the ring has ranks, each block's sums are back at its owner, complete (``own``).
    The sums and the spare they arrive in are new tensors, or with ``through`` the
    fronts of its two slots, which its copy engine transfers write.
    """

    def __init__(
        self,
        clock: WaitClock,
        shape: torch.Size,
        device: torch.device,
        send_to: int,
        receive_from: int,
        through: PeerBuffers | None = None,
    ):
        self.clock, self.send_to, self.receive_from, self.through = clock, send_to, receive_from, through
        if through is None:
            self.sums = torch.zeros(shape, dtype=torch.float32, device=device)
            self.spare = torch.empty_like(self.sums)
        else:
            self.sums, self.spare = (slot.view(-1)[: shape.numel()].view(shape) for slot in through.slots)
            self.sums.zero_()
        self.transfers: list = []

    def held(self, step: int) -> torch.Tensor:
        """The sums of the block held in ``step`` (waited for from the neighbour after step 0)."""
        if step > 0:
            self.clock.wait(self.transfers)
            self.sums, self.spare = self.spare, self.sums
        return self.sums

    def pass_on(self) -> None:
        self.transfers = self.clock.exchange(self.sums, self.spare, self.send_to, self.receive_from, self.through)

    def own(self) -> torch.Tensor:
        """After the last ``pass_on``: this rank's own block's sums, over every rank. The sums let go of
        both their buffers, so that what the caller drops of them is freed however long it keeps this."""
        self.clock.wait(self.transfers)
        owned = self.spare
        del self.sums, self.spare
        return owned
