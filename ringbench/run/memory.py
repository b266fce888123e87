"""Peak device memory of one call, measured in a pass of its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MIB = 2**20


@dataclass(frozen=True)
class Memory:
    peak_allocated_mib: float  # allocated above the baseline (inputs and cached state) during the call
    peak_reserved_mib: float  # what the caching allocator held at its highest during the call
    held_mib: float  # what the cell holds when the call starts: inputs (or a rank's shards), buffers kept by setup


def allocated_mib(device: torch.device) -> float:
    """What the caching allocator has handed out on ``device``, MiB; 0 on the CPU."""
    return torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else 0.0


def headroom(device: torch.device, capacity_bytes: int | None) -> int | None:
    """What this process may still allocate on ``device``: up to its capacity (``Cap``) and to what the
    device has free, counting memory the caching allocator holds unused; None on the CPU."""
    if device.type != "cuda" or capacity_bytes is None:
        return None
    allocated = torch.cuda.memory_allocated(device)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - allocated
    return max(0, min(capacity_bytes - allocated, free))


def measure_peak(fn: Callable[[], object], device: torch.device, floor_mib: float) -> Memory | None:
    """Peak memory of one call to ``fn`` on a CUDA device; None on the CPU, where none is measured.

    Plain calls on the default stream, before any timing mode is set up, so the
    figures do not depend on the mode (a CUDA graph's memory pool, a capture
    stream's workspace). A first call pays one-off allocations; the second is
    measured. ``floor_mib`` is what the worker held before the cell began
    (workspaces kept from earlier cells): held memory counts from there.
    """
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    reserved = torch.cuda.max_memory_reserved(device)
    del out
    return Memory(peak_allocated_mib=peak / MIB, peak_reserved_mib=reserved / MIB, held_mib=baseline / MIB - floor_mib)


GIB = 2**30


@dataclass(frozen=True)
class Cap:
    """A sweep's ``memory_cap_gib`` on one device: the share of the device's memory each worker's CUDA
    caching allocator is held to (``torch.cuda.set_per_process_memory_fraction``: an allocation past
    it raises out-of-memory as if the device were that small), None where nothing is capped, and
    the bytes a probe may use (the cap, or the whole device; None on the CPU)."""

    fraction: float | None
    capacity_bytes: int | None
    note: str

    @classmethod
    def of(cls, cap_gib: float | None, device: torch.device) -> Cap:
        if device.type != "cuda":
            note = f"{cap_gib:g} GiB, ignored on the CPU: it has no caching allocator to cap" if cap_gib else "none"
            return cls(None, None, note)
        total = torch.cuda.get_device_properties(device).total_memory
        if cap_gib is None:
            return cls(None, total, "none")
        if cap_gib * GIB >= total:
            return cls(None, total, f"{cap_gib:g} GiB, not below the device's {total / GIB:,.1f} GiB: not applied")
        # Memory outside the caching allocator (the CUDA context, NCCL's buffers) is not capped.
        fraction = cap_gib * GIB / total
        return cls(fraction, int(cap_gib * GIB), f"{cap_gib:g} GiB per process ({fraction:.3f} of the device's memory)")

    def apply(self, device: torch.device) -> None:
        if self.fraction is not None:
            torch.cuda.set_per_process_memory_fraction(self.fraction, device)
