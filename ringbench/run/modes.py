"""Measurement modes beyond plain back-to-back calls, and the device's matmul ceiling.

- Cold L2: before each repetition a buffer larger than any GPU's L2 cache is
  overwritten, so no repetition finds its inputs cached by the one before; the
  flush sits outside the repetition's events, so its time is excluded.
- CUDA-graph replay: for calls short enough that launch overhead dominates, the
  closure is captured once into a CUDA graph and the graph is replayed. Where
  capture is impossible (host synchronisation, data-dependent control flow,
  communication), the closure runs as it is and the record says why.
- Matmul peak: a dense product of two 8192×8192 matrices in the benchmark dtype,
  timed for a fraction of a second, is the practical ceiling TFLOP/s are set against.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import cache

import torch

# Larger than the L2 of any current GPU (H100: 50 MB); 256 MB as DESIGN's practice advises.
FLUSH_BYTES = 256 * 2**20
PEAK_SIZE = 8192
PEAK_REPS = 10


def l2_flush(device: torch.device) -> Callable[[], None] | None:
    """A function that overwrites a 256 MB buffer, or None off the GPU (no cache to clear this way)."""
    if device.type != "cuda":
        return None
    buffer = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def flush() -> None:
        buffer.fill_(0)

    return flush


@cache
def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    # One side stream for the worker's life: cuBLAS keeps a workspace per stream for as
    # long as the process lives, so a fresh stream per cell would leave one behind each time.
    return torch.cuda.Stream(device)


def graph_replay(fn: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], str | None]:
    """(a closure replaying ``fn`` captured as a CUDA graph, None) or, where that fails, (``fn``, why)."""
    if device.type != "cuda":
        return fn, "CUDA graphs need a CUDA device"
    side = _capture_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):  # capture wants the closure warmed up off the default stream
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            fn()
    except Exception as exc:  # capture refuses many things; each is a reason to fall back, not to fail
        torch.cuda.synchronize(device)
        return fn, f"capture failed, plain calls timed instead: {type(exc).__name__}: {exc}"
    return graph.replay, None


def prime_libraries(device: torch.device, dtypes: list[torch.dtype]) -> None:
    """Make the libraries allocate what they keep for the process's life (cuBLAS workspaces)
    before the first cell, so that no cell's held memory includes them and the others' not."""
    if device.type != "cuda":
        return
    for dtype in dtypes:
        a = torch.ones(64, 64, device=device, dtype=dtype)
        torch.matmul(a, a)
    torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense matmul rate for ``dtype``, in TFLOP/s; None on the CPU."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        torch.matmul(a, b)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(PEAK_REPS)]
    for start, end in pairs:
        start.record()
        torch.matmul(a, b)
        end.record()
    torch.cuda.synchronize(device)
    median_ms = statistics.median(start.elapsed_time(end) for start, end in pairs)
    return 2 * PEAK_SIZE**3 / (median_ms / 1e3) / 1e12
