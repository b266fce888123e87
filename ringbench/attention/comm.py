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


def sums_slots(ring_size: int) -> tuple[int, bool]:
    """The buffers that receive :class:`TravellingSums`' hops in a ring of ``ring_size``, each of one
    message's size: how many, and whether in the blocks' gradients' dtype (else float32). In a ring of two, one
    for its one hop, in the blocks' dtype; beyond, two float32, which hops take by turns (the
    first hop, in the blocks' dtype, at the front of one)."""
    return (1, True) if ring_size == 2 else (2, False)


class TravellingSums:
    """Gradient sums that travel a ring one step behind the K/V blocks they belong to.

    A rank's gradient for its own K/V block (step 0) stays with it (:meth:`keep`). From step 1
    on the rank holds a neighbour's block: in step 1 its gradient for that block starts the
    block's sums, and in each later step it receives the sums so far from its neighbour, adds its
    share and passes them on (:meth:`add`). After the last step every block's sums arrive home
    and join the owner's own gradient (:meth:`settle`). The first hop carries one block's
    gradient, exact in ``dtype``, the one block backwards return (``blocks.gradient_dtype``),
    and travels in it (in a ring of two it is the only hop); later hops carry float32 sums.
    Messages arrive in new tensors or, with ``through``, in its slots (hop h in slot
    (h − 1) mod 2), which its copy engine transfers write; no rank receives into the slot it
    sends from.
    """

    def __init__(
        self,
        clock: WaitClock,
        shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        ring_size: int,
        send_to: int,
        receive_from: int,
        through: PeerBuffers | None = None,
    ):
        self.clock, self.shape, self.dtype, self.device = clock, shape, dtype, device
        self.ring_size, self.send_to, self.receive_from, self.through = ring_size, send_to, receive_from, through
        self.transfers: list = []
        self.arriving: torch.Tensor | None = None
        self.own: tuple[torch.Tensor, ...] | None = None

    def add(self, step: int, grads: Sequence[torch.Tensor] | None = None, rows: slice = slice(None)) -> None:
        """Step ``step`` (1 on): this rank's gradient (dK, dV) for the block it holds, over the block's
        ``rows`` (None where it skipped the block), joins the block's sums, which go on to the next rank."""
        if step == 1:
            sums = self._first(grads, rows)
        else:
            sums = self._arrived()
            if sums.dtype != torch.float32:  # the first hop, in the blocks' dtype
                sums = sums.float()
            if grads is not None:
                sums[0][..., rows, :] += grads[0]
                sums[1][..., rows, :] += grads[1]
        self.arriving = self._receiver(hop=step)
        self.transfers = self.clock.exchange(sums, self.arriving, self.send_to, self.receive_from, self.through)

    def _first(self, grads: Sequence[torch.Tensor] | None, rows: slice) -> torch.Tensor:
        """Step 1's message: the block's gradient, zero in the rows the block did not take."""
        every = rows.indices(self.shape[-2]) == (0, self.shape[-2], 1)
        if grads is not None and every:
            return torch.stack(tuple(grads))
        sums = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        if grads is not None:
            sums[0][..., rows, :] = grads[0]
            sums[1][..., rows, :] = grads[1]
        return sums

    def _receiver(self, hop: int) -> torch.Tensor:
        """Where hop ``hop`` (that after step ``hop``) arrives from the previous rank."""
        dtype = self.dtype if hop == 1 else torch.float32
        if self.through is None:
            return torch.empty(self.shape, dtype=dtype, device=self.device)
        slot = self.through.slots[(hop - 1) % 2]
        return slot.view(-1).view(dtype)[: self.shape.numel()].view(self.shape)

    def _arrived(self) -> torch.Tensor:
        assert self.arriving is not None, "a hop was posted"
        self.clock.wait(self.transfers)
        arrived, self.arriving = self.arriving, None
        return arrived

    def keep(self, grads: Sequence[torch.Tensor]) -> None:
        """Step 0: this rank's gradient (dK, dV) for its own block, which stays with it."""
        self.own = tuple(grads)

    def settle(self, into: torch.Tensor) -> None:
        """After the last step: wait for this rank's block's sums to come home and store them, added to
        the rank's own gradient, into ``into`` (dK and dV stacked), computed in float32 and rounded
        once into its dtype; in a ring of one, the own gradient alone. Lets go of both, so that
        whoever keeps this object keeps no memory."""
        assert self.own is not None, "kept in step 0"
        arrived = self._arrived() if self.ring_size > 1 else None
        for index, (target, mine) in enumerate(zip(into, self.own)):
            if arrived is None:
                target.copy_(mine)
            else:
                torch.add(arrived[index], mine, out=target)
        self.own = None
