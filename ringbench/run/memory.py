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
