"""A GPU's clocks while a cell's samples are timed.

A GPU held at its power or thermal limit runs the same kernels at a lower SM clock, and how
far it lowers it moves with its temperature and differs from chip to chip: two H200s of one
host, both at their 700 W cap, ran 31–43 MHz apart under the same work
(results/evidence/probes/clocks/). So two cells timed minutes apart, or on different GPUs of
a run, need not have run at one clock, and a ratio between them carries the difference. A
:class:`Watch` reads the GPU's state from NVML every ``INTERVAL_S`` on a thread of its own
while the samples run, and sums it up as a record's :class:`GpuState`.
"""

from __future__ import annotations

import functools
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ringbench.schema import GpuState
from ringbench.vocabulary import clock_reasons

# Often enough for a second's sample to be read many times; each read is a few NVML queries.
INTERVAL_S = 0.05


@dataclass(frozen=True)
class Reading:
    """One look at the GPU: its SM clock, board power, die temperature and NVML's clock-event mask."""

    sm_clock_mhz: float
    power_w: float
    temperature_c: float
    reasons: int


def summarize(readings: list[Reading], rank: int, top_mhz: float) -> GpuState:
    """What ``readings`` of rank ``rank``'s GPU, whose SM clock tops out at ``top_mhz``, come to."""
    mask = 0
    for reading in readings:
        mask |= reading.reasons
    return GpuState(
        rank=rank,
        sm_clock_mhz=statistics.fmean(reading.sm_clock_mhz for reading in readings),
        sm_clock_min_mhz=min(reading.sm_clock_mhz for reading in readings),
        sm_clock_top_mhz=top_mhz,
        power_w=statistics.fmean(reading.power_w for reading in readings),
        temperature_c=max(reading.temperature_c for reading in readings),
        held_by=tuple(clock_reasons(mask)),
        readings=len(readings),
    )


class Gauge(Protocol):
    """What a :class:`Watch` reads: a GPU's top SM clock, and its state now."""

    top_mhz: float

    def read(self) -> Reading: ...


class Nvml:
    """NVML's view of the GPU that ``device`` is, found by its UUID, which no renumbering of the
    visible devices changes."""

    def __init__(self, device: torch.device):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        uuid = torch.cuda.get_device_properties(device).uuid
        self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        self.top_mhz = float(pynvml.nvmlDeviceGetMaxClockInfo(self._handle, pynvml.NVML_CLOCK_SM))

    def read(self) -> Reading:
        nvml, handle = self._nvml, self._handle
        return Reading(
            sm_clock_mhz=float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            reasons=int(nvml.nvmlDeviceGetCurrentClocksEventReasons(handle)),
        )


@functools.cache  # one per device and process: every cell of a worker reads the same GPU
def _opened(device: torch.device) -> Nvml | str:
    """NVML's view of the GPU ``device``, or why there is none."""
    try:
        return Nvml(device)
    except Exception as error:  # no pynvml, no NVML library, a GPU NVML does not list: nothing to read
        return f"{type(error).__name__}: {error}"


def nvml_of(device: torch.device) -> Nvml | None:
    """NVML's view of ``device``; None on the CPU, and where NVML cannot be loaded or find the GPU
    (the record then says nothing of its clocks, as on the CPU; :func:`unreadable` says why)."""
    if device.type != "cuda":
        return None
    opened = _opened(device)
    return None if isinstance(opened, str) else opened


def unreadable(device: torch.device) -> str | None:
    """Why the clocks of the GPU ``device`` cannot be read; None where they can, and on the CPU."""
    if device.type != "cuda":
        return None
    opened = _opened(device)
    return opened if isinstance(opened, str) else None


class Watch:
    """Reads a GPU through ``source`` from entering until leaving, at the start, every ``INTERVAL_S``
    and at the end (so a window shorter than the interval is still read twice)."""

    def __init__(self, source: Gauge | None, interval_s: float = INTERVAL_S):
        self._source, self._interval_s = source, interval_s
        self._readings: list[Reading] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self, read: Callable[[], Reading]) -> bool:
        """One reading; False where NVML failed, after which the readings so far stand alone."""
        try:
            self._readings.append(read())
        except Exception:  # NVML lost the GPU mid-cell: its clocks must not cost the cell
            return False
        return True

    def _poll(self, read: Callable[[], Reading]) -> None:
        while not self._done.wait(self._interval_s) and self._take(read):
            pass

    def __enter__(self) -> Watch:
        if self._source is not None and self._take(self._source.read):
            self._thread = threading.Thread(target=self._poll, args=(self._source.read,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._source is not None and self._thread is not None:
            self._done.set()
            self._thread.join()
            self._take(self._source.read)

    def state(self, rank: int) -> GpuState | None:
        """What the GPU ran at while watched; None where there was nothing to read."""
        if self._source is None or not self._readings:
            return None
        return summarize(self._readings, rank, self._source.top_mhz)
