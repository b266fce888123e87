"""Timing a closure: CUDA events on a GPU, ``perf_counter_ns`` on the CPU.

After a first call, warm-up runs for its millisecond budget (as many calls as one
probe call says fit); its samples estimate the cost of one call, from which the
number of timed repetitions follows (``rep_ms`` over that estimate, clamped to
``[min_reps, max_reps]``). While the samples' IQR / median is above the noise
target, sampling continues, up to ``max_ms`` of samples or ``max_reps`` samples.
Every sample is kept, warm-ups included.

A sample is one call, or with ``sample_ms`` the mean time per call of enough
back-to-back calls to last that long. A GPU held at its power limit moves its
clocks in swings that can last a second; one-call samples then measure the
swing, while samples spanning it measure the code (each call keeps its own event
pair, so a cold-L2 flush stays outside every sample).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ringbench.run.stats import relative_iqr
from ringbench.sweep.config import TimingBudget


@dataclass(frozen=True)
class Timing:
    warmup_ms: tuple[float, ...]  # one call each
    samples_ms: tuple[float, ...]  # mean milliseconds per call over ``calls_per_sample`` calls each
    calls_per_sample: int


def _time_calls_cpu(fn: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


# Graph replays are queued in chunks, each behind a kernel that holds the GPU while the
# host queues the chunk. A replay can take less GPU time than its launch takes the host;
# unheld, the GPU would then wait on the host between a replay's events, and the events
# would time the host (nvbench holds the GPU with a blocking kernel alike). Plain calls
# are not held: their time includes the launch wherever the launch is the slower part,
# as it does where they are used. A hold lasts twice the quickest chunk's queuing so far,
# so one chunk the host was slow to queue does not lengthen every later hold.
HOLD_CHUNK = 64
HOLD_MS = (1.0, 20.0)
CYCLES_PER_MS = 2_000_000  # ~2 GHz, the top SM clock of current GPUs: lower clocks only hold longer


def _queue(fn: Callable[[], object], pairs: list, flush: Callable[[], None] | None) -> None:
    for start, end in pairs:
        if flush:  # a cache flush goes before the start event
            flush()
        start.record()
        fn()
        end.record()


def _time_calls_cuda(
    fn: Callable[[], object], count: int, flush: Callable[[], None] | None = None, hold: bool = False
) -> list[float]:
    # One event pair per call and a single synchronize at the end, so the host never
    # stalls the queue between repetitions.
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    if hold:
        quickest_ms = math.inf  # so the first chunk gets the longest hold
        for first in range(0, count, HOLD_CHUNK):
            hold_gpu(min(max(2 * quickest_ms, HOLD_MS[0]), HOLD_MS[1]))
            queuing = time.perf_counter()
            _queue(fn, pairs[first : first + HOLD_CHUNK], flush)
            quickest_ms = min(quickest_ms, 1e3 * (time.perf_counter() - queuing))
    else:
        _queue(fn, pairs, flush)
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def _same(value: float) -> float:
    return value


def measure(
    fn: Callable[[], object],
    device: torch.device,
    budget: TimingBudget,
    agree: Callable[[float], float] = _same,
    flush: Callable[[], None] | None = None,
    hold: bool = False,
    while_sampling: contextlib.AbstractContextManager[object] | None = None,
) -> Timing:
    """Warm up, then time ``fn`` repeatedly; samples are milliseconds per call.

    ``agree`` turns a local count or estimate into the one every rank uses (the
    maximum over ranks in a process group): collective closures must run the same
    number of times everywhere. ``hold`` queues calls behind a holding kernel, for
    CUDA-graph replays. ``while_sampling`` is entered for the samples, warm-up left out
    (a ``clocks.Watch``).
    """
    if device.type == "cuda":

        def time_calls(fn: Callable[[], object], count: int) -> list[float]:
            return _time_calls_cuda(fn, count, flush, hold)
    else:
        time_calls = _time_calls_cpu
    # The first call pays one-off costs (kernel selection and compilation, workspace
    # allocation), so it neither counts against the warm-up budget nor feeds the estimate.
    first = time_calls(fn, 1)
    probe = time_calls(fn, 1)
    estimate_ms = max(agree(probe[0]), 1e-6)
    more = min(max(math.ceil(budget.warmup_ms / estimate_ms) - 1, 0), budget.max_reps - 1)
    warmup = probe + time_calls(fn, more)
    call_ms = max(statistics.median(warmup), 1e-6)
    calls = int(agree(max(math.ceil(budget.sample_ms / call_ms), 1)))

    def take(count: int) -> list[float]:
        return per_sample(time_calls(fn, count * calls), calls)

    reps = int(budget.rep_ms / (call_ms * calls))
    with while_sampling or contextlib.nullcontext():
        samples = take(int(agree(min(max(reps, budget.min_reps), budget.max_reps))))
        # Noisy cells get more samples, half as many again each round, within the caps.
        while more := int(agree(_more_needed(samples, budget, calls))):
            samples += take(more)
    return Timing(tuple(first + warmup), tuple(samples), calls)


def per_sample(call_ms: list[float], calls: int) -> list[float]:
    """Consecutive calls' times, ``calls`` at a time, as mean milliseconds per call."""
    return [statistics.fmean(call_ms[start : start + calls]) for start in range(0, len(call_ms), calls)]


@dataclass(frozen=True)
class Launch:
    """One call's cost to the host and to the GPU, each alone."""

    host_ms: float  # the host's time to launch the call, while the GPU is held back
    device_ms: float  # the GPU's time for the call, its kernels run back to back


PROBES = 3
MAX_PROBE_HOLD_MS = 1000.0
# Where one call's launch comes to this share of its GPU work, the host's figure decides how the
# cell is timed (and the scaling model's pace for it): it is taken again from calls queued back to
# back, the first not counted. A lone call's launch starts cold after the host has waited: in
# host-bound cells on an H200 it was off the pace of plain calls by a median 13% (up to 3.2x), the
# later calls of a queue by a median 7% (results/evidence/probes/probe_launch.txt).
WARM_PROBE_SHARE = 0.25
WARM_CALLS = 4


def hold_gpu(ms: float) -> None:
    """Keep the current GPU stream busy for at least ``ms``, while the host queues what follows."""
    torch.cuda._sleep(int(ms * CYCLES_PER_MS))


def launch_and_work(fn: Callable[[], object], device: torch.device, agree: Callable[[float], float] = _same) -> Launch:
    """The host's and the GPU's time for one call, each alone (:func:`_probe`): from one call queued
    at a time, or, where the host's share comes near the GPU's, from several queued back to back.

    Across processes every rank probes at once: ``agree`` (the group's maximum, which every rank
    waits for) makes the holds equal and starts them together, so no rank's work waits on a peer
    held longer; the figures are every rank's largest, so every rank takes the same branch.
    """
    alone = _probe(fn, device, agree, calls=1)
    if alone.host_ms < WARM_PROBE_SHARE * alone.device_ms:
        return alone
    return _probe(fn, device, agree, calls=WARM_CALLS)


def _probe(fn: Callable[[], object], device: torch.device, agree: Callable[[float], float], calls: int) -> Launch:
    """Median of a few probes: the GPU is held by a sleeping kernel while the host queues ``calls``
    calls, so the host's clock times the launches alone (of the calls after the first, where there
    are several) and the calls' events the GPU's work alone (their median).

    The hold lasts twice the calls' plain wall time, so the host has queued them all before the
    GPU reaches them.
    """
    torch.cuda.synchronize(device)
    begin = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    hold_ms = agree(min(2e3 * calls * (time.perf_counter() - begin) + HOLD_MS[0], MAX_PROBE_HOLD_MS))
    first_counted = min(calls - 1, 1)  # of several calls the first is not counted
    host, work = [], []
    for _ in range(PROBES):
        agree(0.0)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        hold_gpu(hold_ms)
        for index, (start, end) in enumerate(pairs):
            if index == first_counted:
                queuing = time.perf_counter()
            start.record()
            fn()
            end.record()
        host.append(1e3 * (time.perf_counter() - queuing) / (calls - first_counted))
        torch.cuda.synchronize(device)
        work.append(statistics.median(start.elapsed_time(end) for start, end in pairs))
    return Launch(agree(statistics.median(host)), agree(statistics.median(work)))


def _more_needed(samples: list[float], budget: TimingBudget, calls_per_sample: int = 1) -> int:
    quiet = relative_iqr(samples) <= budget.noise_target
    if quiet or sum(samples) * calls_per_sample >= budget.max_ms or len(samples) >= budget.max_reps:
        return 0
    return min(max(len(samples) // 2, budget.min_reps), budget.max_reps - len(samples))
