import dataclasses
import itertools
import time

import torch

from ringbench.run.stats import relative_iqr, summarize
from ringbench.run.timing import _more_needed, measure, per_sample
from ringbench.sweep.config import TimingBudget

CPU = torch.device("cpu")


def sleeper(ms: float):
    return lambda: time.sleep(ms / 1e3)


def test_repetitions_are_clamped_to_max():
    timing = measure(
        sleeper(1), CPU, TimingBudget(warmup_ms=0.001, rep_ms=10_000, min_reps=2, max_reps=7, noise_target=100)
    )
    assert len(timing.samples_ms) == 7
    assert len(timing.warmup_ms) == 2  # the first call, then one that spends the whole warm-up budget
    assert all(sample >= 1.0 for sample in timing.samples_ms + timing.warmup_ms)


def test_repetitions_are_clamped_to_min():
    timing = measure(
        sleeper(2), CPU, TimingBudget(warmup_ms=0.001, rep_ms=0.001, min_reps=4, max_reps=100, noise_target=100)
    )
    assert len(timing.samples_ms) == 4


def test_warmup_stops_at_max_reps_for_trivial_closures():
    timing = measure(
        lambda: None, CPU, TimingBudget(warmup_ms=10_000, rep_ms=1e-9, min_reps=1, max_reps=5, noise_target=100)
    )
    assert len(timing.warmup_ms) == 1 + 5 and len(timing.samples_ms) == 1


def test_a_slow_first_call_does_not_shrink_the_sample():
    calls = []

    def cold_then_fast():
        time.sleep(0.2 if not calls else 0.001)
        calls.append(1)

    timing = measure(
        cold_then_fast, CPU, TimingBudget(warmup_ms=5, rep_ms=30, min_reps=2, max_reps=1000, noise_target=100)
    )
    assert timing.warmup_ms[0] >= 200 and len(timing.warmup_ms) >= 2
    assert len(timing.samples_ms) >= 5  # estimated from warm calls (~1 ms), not from the 200 ms first one


def test_summary_statistics():
    stats = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats == {
        "n": 5,
        "median_ms": 3.0,
        "mean_ms": 4.0,
        "std_ms": (sum((x - 4) ** 2 for x in [1, 2, 3, 4, 10]) / 4) ** 0.5,
        "q1_ms": 2.0,
        "q3_ms": 4.0,
        "iqr_ms": 2.0,
        "rel_iqr": 2.0 / 3.0,
        "min_ms": 1.0,
        "max_ms": 10.0,
    }
    assert summarize([5.0])["std_ms"] == 0.0


def test_noisy_samples_ask_for_more_within_the_caps():
    budget = TimingBudget(min_reps=5, max_reps=40, noise_target=0.02, max_ms=100)
    assert _more_needed([2.0] * 10, budget) == 0  # quiet: IQR / median is 0
    noisy = [1.0, 3.0] * 6
    assert _more_needed(noisy, budget) == 6  # half as many again
    assert _more_needed(noisy[:4], budget) == 5  # at least min_reps
    assert _more_needed([1.0, 3.0] * 19, budget) == 2  # no further than max_reps
    assert _more_needed([10.0, 30.0] * 5, budget) == 0  # max_ms of samples already spent


def test_sampling_continues_while_noisy():
    calls = []

    def alternating():
        time.sleep(0.001 if len(calls) % 2 else 0.004)
        calls.append(1)

    timing = measure(
        alternating,
        CPU,
        TimingBudget(warmup_ms=0.001, rep_ms=0.001, min_reps=4, max_reps=30, noise_target=0.02, max_ms=10_000),
    )
    assert len(timing.samples_ms) == 30


def test_per_sample_means_consecutive_calls():
    assert per_sample([1.0, 3.0, 2.0, 6.0, 5.0, 7.0], 2) == [2.0, 4.0, 6.0]
    assert per_sample([1.0, 3.0], 1) == [1.0, 3.0]


def test_samples_spanning_a_clock_swing_are_quiet(monkeypatch):
    # A device whose clock swings: calls alternate 1 ms and 3 ms. The first call (1 ms)
    # is set apart, the probe (3 ms) spends the 2 ms warm-up, so one call is estimated at
    # 3 ms and sample_ms = 6 groups two calls a sample: every sample is then 2 ms, quiet
    # at min_reps, where one-call samples stay noisy up to max_reps.
    def swinging_clock():
        clock = itertools.cycle([1.0, 3.0])
        monkeypatch.setattr(
            "ringbench.run.timing._time_calls_cpu", lambda fn, count: [next(clock) for _ in range(count)]
        )

    budget = TimingBudget(warmup_ms=2, rep_ms=1, min_reps=6, max_reps=40, noise_target=0.02, max_ms=1000)
    swinging_clock()
    one_call = measure(lambda: None, CPU, budget)
    assert one_call.calls_per_sample == 1 and len(one_call.samples_ms) == 40
    swinging_clock()
    grouped = measure(lambda: None, CPU, dataclasses.replace(budget, sample_ms=6))
    assert grouped.warmup_ms == (1.0, 3.0)
    assert grouped.calls_per_sample == 2 and grouped.samples_ms == (2.0,) * 6


def test_max_ms_counts_every_call_of_a_grouped_sample():
    budget = TimingBudget(min_reps=2, max_reps=100, noise_target=0.02, max_ms=100)
    noisy = [1.0, 3.0] * 10  # 40 ms of samples
    assert _more_needed(noisy, budget, calls_per_sample=2) == 10
    assert _more_needed(noisy, budget, calls_per_sample=3) == 0  # 120 ms of calls spent


def test_stopping_rule_on_quiet_noisy_and_drifting_streams(monkeypatch):
    def clock(times):
        stream = iter(times)
        monkeypatch.setattr(
            "ringbench.run.timing._time_calls_cpu", lambda fn, count: [next(stream) for _ in range(count)]
        )

    budget = TimingBudget(warmup_ms=1, rep_ms=10, min_reps=8, max_reps=40, noise_target=0.02, max_ms=1000)
    clock(itertools.repeat(2.0))
    quiet = measure(lambda: None, CPU, budget)
    assert len(quiet.samples_ms) == 8 and relative_iqr(quiet.samples_ms) == 0  # quiet at once: min_reps
    clock(itertools.cycle([1.0, 1.5]))
    noisy = measure(lambda: None, CPU, budget)
    assert len(noisy.samples_ms) == 40  # never quiet: up to max_reps
    # A drifting device (each call 1% slower than the last): more samples only widen the
    # spread, so sampling runs to the cap and the noise target stays unreached.
    clock(1.0 + 0.01 * i for i in itertools.count())
    drifting = measure(lambda: None, CPU, budget)
    assert len(drifting.samples_ms) == 40
    assert drifting.samples_ms[0] == 1.02 and relative_iqr(drifting.samples_ms) > budget.noise_target


def test_the_launch_is_probed_again_from_queued_calls_only_where_the_host_comes_near_the_gpu(monkeypatch):
    """One call queued at a time first; where its launch reaches a quarter of its GPU work, the
    figures come from calls queued back to back instead (the branch on agreed figures only)."""
    from ringbench.run import timing

    def probes(first):
        taken = []

        def probe(fn, device, agree, calls):
            taken.append(calls)
            return first if calls == 1 else timing.Launch(host_ms=0.9, device_ms=1.0)

        monkeypatch.setattr(timing, "_probe", probe)
        return taken, timing.launch_and_work(lambda: None, torch.device("cpu"))

    assert probes(timing.Launch(host_ms=0.2, device_ms=1.0)) == ([1], timing.Launch(0.2, 1.0))
    assert probes(timing.Launch(host_ms=0.3, device_ms=1.0)) == ([1, timing.WARM_CALLS], timing.Launch(0.9, 1.0))
