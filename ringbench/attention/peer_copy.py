"""Ring transfers by the copy engine: a rank writes its message straight into its next rank's
receive buffer, held in PyTorch's symmetric memory, with a device-to-device copy that the
GPU's copy engine carries out. The SMs stay with the block kernel, where NCCL's point-to-point
kernels take some of them for the whole transfer (README, "Ring across processes").

Two flags per buffer order the writes, in symmetric memory's signal pads: *free*, the receiver
is done with the buffer (it computed on it and sent it on), and *ready*, the message is in. A
transfer grants the previous rank the buffer this rank receives into, waits for the next rank's
grant of the buffer it writes to, copies, and marks that ready; the receiver waits for ready
before its compute stream reads. Every rank posts the same transfers into the same buffers in
the same order, so grants and waits pair up within a call, and a call starts with nothing owed.
The grant is safe when it is posted: the copy stream first waits for everything the compute
stream has queued, and the buffer, received one transfer earlier, was read by that work and by
the copy before.

The flags are set and awaited by CUDA's stream memory operations, which the stream's front end
carries out, not by kernels: the block kernel fills every SM for as long as it runs, and a
kernel of the copy stream that became ready beside it, however small, would wait for the
block to finish and hold the transfer back with it.

All ranks of the ring must be GPUs of one host: symmetric memory maps the peers' buffers into
each process.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symmetric_memory


def unavailable(device: torch.device) -> str | None:
    """Why this process group's ranks cannot use copy-engine transfers, or None where they can; every
    rank reaches the same answer, from every rank's host and GPU."""
    if device.type != "cuda":
        return "the ranks are not GPUs"
    places: list[tuple[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(places, (socket.gethostname(), device.index))
    if len({place[0] for place in places if place}) > 1:
        return "the ranks span hosts"
    if _driver() is None:  # one host, one driver: every rank answers alike
        return "the CUDA driver has no stream memory operations"
    gpus = sorted({place[1] for place in places if place})
    if not all(torch.cuda.can_device_access_peer(one, other) for one in gpus for other in gpus if one != other):
        return "the GPUs cannot reach each other's memory"
    return None


# A buffer slot's two flags.
FREE, READY = 0, 1


def flag_word(slot: int, kind: int, writer: int, ranks: int) -> int:
    """Where, in 32-bit words into a rank's signal pad, the ``kind`` flag of buffer ``slot`` lies that
    rank ``writer`` of a group of ``ranks`` sets: one word per flag and writer, so no two ranks ever
    write the same word, and slots × 2 × ranks words in all."""
    return (2 * slot + kind) * ranks + writer


# From the CUDA driver's cuda.h: a wait until the word equals the value, that wait followed by a flush
# of remote writes already arrived (so that the message a flag announces is seen), and the device
# attribute that says whether the flush is supported.
_WAIT_EQUAL, _WAIT_FLUSH, _CAN_FLUSH_REMOTE_WRITES = 0x1, 1 << 30, 98


@functools.cache
def _driver() -> ctypes.CDLL | None:
    """The CUDA driver's library, with its stream memory operations typed; None without them."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        operations = (driver.cuStreamWaitValue32_v2, driver.cuStreamWriteValue32_v2)
    except (OSError, AttributeError):
        return None
    for operation in operations:  # (CUstream, CUdeviceptr, cuuint32_t value, unsigned int flags)
        operation.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    return driver


def _queue(operation: str, stream: torch.cuda.Stream, address: int, value: int, flags: int = 0) -> None:
    """Queue the stream memory operation ``operation`` (cuStreamWaitValue32 or cuStreamWriteValue32)
    on ``stream`` for the 32-bit word at ``address``."""
    driver = _driver()
    assert driver is not None, "unavailable() checks for the driver first"
    result = getattr(driver, f"{operation}_v2")(stream.cuda_stream, address, value, flags)
    if result:
        raise RuntimeError(f"{operation} failed: CUresult {result}")


@functools.cache
def _flush(device_index: int) -> int:
    """The wait flag that flushes remote writes, where device ``device_index`` supports it; else 0."""
    driver, device, supported = _driver(), ctypes.c_int(), ctypes.c_int()
    assert driver is not None, "unavailable() checks for the driver first"
    if driver.cuDeviceGet(ctypes.byref(device), device_index) or driver.cuDeviceGetAttribute(
        ctypes.byref(supported), _CAN_FLUSH_REMOTE_WRITES, device
    ):
        raise RuntimeError(f"the CUDA driver could not say whether device {device_index} flushes remote writes")
    return _WAIT_FLUSH if supported.value else 0


def _raise_flag(stream: torch.cuda.Stream, address: int) -> None:
    """Queue on ``stream`` setting the flag at ``address``; the write follows a fence, so that
    whoever sees it set sees the stream's earlier writes too."""
    _queue("cuStreamWriteValue32", stream, address, 1)


def _take_flag(stream: torch.cuda.Stream, address: int) -> None:
    """Queue on ``stream`` a wait until the flag at ``address`` (in this rank's pad) is set, and its reset."""
    _queue("cuStreamWaitValue32", stream, address, 1, _WAIT_EQUAL | _flush(stream.device_index))
    _queue("cuStreamWriteValue32", stream, address, 0)


class PeerBuffers:
    """``count`` buffers of ``shape`` on every rank of ``group``, in one symmetric allocation, that
    :meth:`post` writes across ranks; ``slots`` are this rank's, to compute on and receive into
    (a receive may use the front of a slot, as a contiguous view of fewer elements)."""

    def __init__(
        self, shape: Sequence[int], count: int, dtype: torch.dtype, device: torch.device, group: dist.ProcessGroup
    ):
        # The copies need no multicast object (NVLS), whose use can take a host's GPUs out of service.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        self._slot_numel = math.prod(shape)
        # Through the caching allocator, whose figures then count it, from a pool of its own: a
        # block given back to a shared pool and reused keeps the rendezvous it was made with, and
        # another rank may reuse a different one for the same buffer. Dropped, the pool's memory
        # goes back to the device at the next empty_cache() (the worker's, after each cell).
        self._pool = torch.cuda.MemPool(symmetric_memory.get_mempool_allocator(device), no_split=True)
        with torch.cuda.use_mem_pool(self._pool):
            storage = torch.empty(count * self._slot_numel, dtype=dtype, device=device)
        self._handle = symmetric_memory.rendezvous(storage, group)
        # The allocator zeroes a new allocation, flags included, on the device's legacy stream, which
        # no copy stream waits for, and peers write into it: every rank's zeroing ends before any
        # rank posts a transfer (else a late zeroing could wipe a message that arrived first).
        torch.cuda.synchronize(device)
        dist.barrier(group)
        self._storage, self._group, self._rank = storage, group, dist.get_rank(group)
        self.slots = tuple(part.view(shape) for part in storage.split(self._slot_numel))
        assert 4 * flag_word(count, FREE, 0, group.size()) <= self._handle.signal_pad_size, "the flags fit the pad"
        self._stream = torch.cuda.Stream(device)

    def post(self, send: torch.Tensor, receive: torch.Tensor, send_to: int, receive_from: int) -> list[Arrival]:
        """Copy ``send`` into rank ``send_to``'s counterpart of ``receive`` (a contiguous view into one of
        this rank's slots), while rank ``receive_from`` writes this rank's ``receive``; returns what
        ``wait()`` makes the compute stream wait for. Ranks are global ranks."""
        offset = receive.data_ptr() - self._storage.data_ptr()
        assert receive.is_contiguous() and 0 <= offset < self._storage.numel() * self._storage.element_size()
        # The allocation is its segment's whole (no_split): offsets into it are the symmetric buffer's.
        # A slot may receive in a dtype other than its own (a view of its front).
        start = offset // receive.element_size()
        slot = offset // (self._slot_numel * self._storage.element_size())
        next_rank, previous_rank = (dist.get_group_rank(self._group, rank) for rank in (send_to, receive_from))
        self._stream.wait_stream(torch.cuda.current_stream(send.device))
        _raise_flag(self._stream, self._flag(previous_rank, slot, FREE))
        _take_flag(self._stream, self._flag(self._rank, slot, FREE, writer=next_rank))
        with torch.cuda.stream(self._stream):
            self._handle.get_buffer(next_rank, tuple(receive.shape), receive.dtype, start).copy_(send)
        _raise_flag(self._stream, self._flag(next_rank, slot, READY))
        send.record_stream(self._stream)  # a temporary ``send`` must outlive the copy
        return [Arrival(self._flag(self._rank, slot, READY, writer=previous_rank))]

    def _flag(self, owner: int, slot: int, kind: int, writer: int | None = None) -> int:
        """The address, in this process, of the ``kind`` flag of ``slot`` in rank ``owner``'s signal pad
        that rank ``writer`` (this one by default) sets; ranks of the group. A flag has one writer."""
        word = flag_word(slot, kind, self._rank if writer is None else writer, self._group.size())
        return self._handle.signal_pad_ptrs[owner] + 4 * word


@dataclass(frozen=True)
class Arrival:
    """A message on its way into this rank's buffer, announced by the flag at ``flag``: ``wait()``
    makes the current stream wait for it, as NCCL's requests do."""

    flag: int

    def wait(self) -> None:
        _take_flag(torch.cuda.current_stream(), self.flag)


@dataclass(frozen=True)
class RingPeers:
    """A ring rank's symmetric buffers: where K/V messages arrive and, in backward passes, where
    the gradient sums do (``comm.TravellingSums``)."""

    kv: PeerBuffers
    sums: PeerBuffers | None
