"""Running one cell: inputs → setup → check → timing → memory → a record (``ringbench.schema.Record``).

Failures never escape: out-of-memory becomes status ``oom``, any other exception
status ``error``, an output beyond tolerance status ``wrong``; the cell's tensors
are released before the next cell starts.

A cell runs on a process group (``ringbench.run.distributed``): one process, or
every rank of a group, through the same phases. The ranks agree after each phase
(setup, check, timing), so a failure on one rank becomes the cell's status on all
of them; they use the same repetition counts; and the record, which rank 0 alone
keeps, holds the maximum over ranks of each sample and of peak memory, beside
every rank's own figures. In one process each of these agreements is trivial.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import torch

from ringbench import records
from ringbench.attention import registry
from ringbench.attention.comm import WaitClock
from ringbench.attention.inputs import Generated
from ringbench.attention.models import PASS_FACTOR, dense_flops, output_bytes
from ringbench.run import clocks, correctness, distributed
from ringbench.run.distributed import OneProcess
from ringbench.run.memory import MIB, allocated_mib, headroom, measure_peak
from ringbench.run.modes import graph_replay, l2_flush
from ringbench.run.stats import summarize
from ringbench.run.timing import launch_and_work, measure
from ringbench.schema import (
    Check,
    Comm,
    Failure,
    GpuState,
    GradientCheck,
    Memory,
    Modes,
    Noise,
    Plain,
    Projected,
    RankFigures,
    RankTraffic,
    Record,
    Stats,
)
from ringbench.sweep.config import TimingBudget
from ringbench.vocabulary import Cell

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# When ranks fail differently, the record names the most telling failure.
_PRECEDENCE = (records.OOM, records.ERROR)
# What measuring a cell found: Record fields by name (a failure's status and error, or every measurement).
Outcome = dict[str, Any]


def make_problem(
    cell: Cell, device: torch.device, seed: int, rank: int = 0, memory_headroom: int | None = None
) -> registry.Problem:
    """The cell's problem on rank ``rank``: inputs made only where asked for (``attention.inputs``), the
    same for every implementation and rank with the same seed."""
    shape = (cell.batch_size, cell.heads, cell.seq_len, cell.head_dim)
    return registry.Problem(
        inputs=Generated(shape, TORCH_DTYPES[cell.dtype], device, seed, requires_grad=cell.pass_name != "forward"),
        causal=cell.causal,
        ring_size=cell.ring_size,
        options=dict(cell.options),
        rank=rank,
        world_size=cell.world_size,
        comm=WaitClock(device) if cell.world_size > 1 else None,
        cell=cell,
        memory_headroom=memory_headroom,
    )


def _pass_closure(
    pass_name: str, run: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor | None
) -> Callable[[], object]:
    """What is timed for a pass. Backward alone reuses one forward's graph (kept with
    retain_graph), so its time holds no forward; forward+backward runs both each call."""
    if pass_name == "forward":
        return run
    if pass_name == "backward":
        output = run()
        return lambda: torch.autograd.grad(output, inputs, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(run(), inputs, grad_out)


def _inputs_mib(cell: Cell) -> float:
    """What a rank's q, k and v take: its share of the sequence (all of it in one process)."""
    return 3 * output_bytes(cell) / cell.world_size / MIB


def _inputs_too_large(cell: Cell, device: torch.device) -> Outcome | None:
    """A skip, decided before allocating, for a cell whose q, k, v alone exceed the device's memory."""
    if device.type != "cuda":
        return None
    needed = _inputs_mib(cell) * MIB
    total = torch.cuda.get_device_properties(device).total_memory
    if needed <= total:
        return None
    return {
        "status": records.SKIPPED,
        "error": Failure(
            "Skipped", f"q, k and v alone need {needed / MIB:,.0f} MiB; the device has {total / MIB:,.0f} MiB"
        ),
    }


def _out_of_memory(exc: BaseException) -> bool:
    # The CPU allocator raises a plain RuntimeError; its message is the only mark.
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


def _failure(exc: BaseException) -> Outcome:
    status = records.OOM if _out_of_memory(exc) else records.ERROR
    return {"status": status, "error": Failure(type(exc).__name__, str(exc))}


def _as_bench(prepared: Callable[[], torch.Tensor] | registry.Bench) -> registry.Bench:
    return prepared if isinstance(prepared, registry.Bench) else registry.Bench(run=prepared)


# A call whose launch takes the host over this share of its GPU work is timed as graph
# replays under `cuda_graph: auto`: plain calls of it time the host's pace (and its
# hiccups) as much as the GPU's. Past half, a hiccup of the host stalls the GPU.
HOST_BOUND_SHARE = 0.5


def _modes(
    fn: Callable[[], object], device: torch.device, budget: TimingBudget, group: OneProcess
) -> tuple[Callable[[], object], Callable[[], None] | None, dict[str, Any]]:
    """The closure to time (perhaps a graph replay), the cache flush, and the modes as recorded."""
    notes = []
    flush = l2_flush(device) if budget.cold_l2 else None
    if budget.cold_l2 and flush is None:
        notes.append("cold L2 applies to GPUs only")
    timed, launch = fn, None
    if budget.cuda_graph != "never":
        if device.type != "cuda":
            notes += ["CUDA graphs need a CUDA device"] if budget.cuda_graph == "always" else []
        elif group.world_size > 1:
            # The host's share is measured all the same, every rank probing at once, so that a cell
            # bound by its launch says so; graphs are not captured across processes.
            launch = launch_and_work(fn, device, group.max)
            notes.append("CUDA graphs are not used across processes: plain calls timed")
        else:
            launch = launch_and_work(fn, device)
            if budget.cuda_graph == "always" or launch.host_ms > HOST_BOUND_SHARE * launch.device_ms:
                timed, why = graph_replay(fn, device)
                notes += [why] if why else []
    return (
        timed,
        flush,
        {
            "cold_l2": flush is not None,
            "cuda_graph": timed is not fn,
            "launch_ms": launch.host_ms if launch else None,
            "device_ms": launch.device_ms if launch else None,
            "notes": notes,
        },
    )


def _time_and_measure(
    fn: Callable[[], object], device: torch.device, budget: TimingBudget, floor_mib: float, group: OneProcess
) -> Projected:
    """Memory, then time of ``fn``; every rank takes the same number of calls (the group's maximum)."""
    agree = group.max
    # Memory first, from plain calls: no timing mode may change what a cell is found to hold.
    memory = measure_peak(fn, device, floor_mib)
    timed, flush, modes = _modes(fn, device, budget, group)
    watch = clocks.Watch(clocks.nvml_of(device))
    timing = measure(timed, device, budget, agree, flush, hold=modes["cuda_graph"], while_sampling=watch)
    plain = None
    if modes["cuda_graph"]:
        del timed  # the graph and its memory pool go before plain calls are timed
        # What the call costs where it is used, launch included; sampled within rep_ms.
        eager = measure(fn, device, replace(budget, max_ms=budget.rep_ms), agree, flush)
        plain = Plain(tuple(eager.samples_ms), Stats(**summarize(eager.samples_ms)), eager.calls_per_sample)
    return Projected(
        modes=Modes(**{**modes, "notes": tuple(modes["notes"])}, calls_per_sample=timing.calls_per_sample),
        warmup_ms=tuple(timing.warmup_ms),
        samples_ms=tuple(timing.samples_ms),
        stats=Stats(**summarize(timing.samples_ms)),
        plain=plain,
        peak_allocated_mib=memory.peak_allocated_mib if memory else None,
        peak_reserved_mib=memory.peak_reserved_mib if memory else None,
        held_mib=memory.held_mib if memory else None,
        gpu=watch.state(group.rank),
    )


def _outcome(
    cell: Cell,
    implementation: registry.Implementation,
    budget: TimingBudget,
    facts: dict,
    check: Check | None,
    main: Projected,
    projected: Projected | None,
    inputs_mib: float,
    ranks: tuple[RankFigures, ...] | None = None,
    gpus: tuple[GpuState, ...] | None = None,
) -> Outcome:
    stats = main.stats
    seconds = stats.median_ms / 1e3
    flops = (implementation.flops(cell) if implementation.flops else dense_flops(cell)) * PASS_FACTOR[cell.pass_name]
    modelled = implementation.memory_model(cell, facts) if implementation.memory_model else None
    return {
        "status": records.WRONG if check and not check.passed else records.OK,
        "facts": facts,
        "check": check,
        "warmup_ms": main.warmup_ms,
        "samples_ms": main.samples_ms,
        "stats": stats,
        "noise": Noise(target=budget.noise_target, rel_iqr=stats.rel_iqr, reached=stats.rel_iqr <= budget.noise_target),
        "modes": main.modes,
        "plain": main.plain,
        "memory": Memory(
            inputs_mib=inputs_mib,
            peak_allocated_mib=main.peak_allocated_mib,
            peak_reserved_mib=main.peak_reserved_mib,
            held_mib=main.held_mib,
            modelled_mib=modelled / MIB if modelled is not None else None,
        ),
        "projected": projected,
        "ranks": ranks,
        "gpus": gpus,
        "flops": flops,
        "tflops": flops / seconds / 1e12,
        "tokens_per_s": cell.batch_size * cell.seq_len / seconds,
    }


def _guarded(step: Callable[[], Outcome | None]) -> Outcome | None:
    """``step``'s result, or the failure record of the exception it raised."""
    try:
        return step()
    except Exception as exc:  # any failure of user or library code is this cell's result, not the sweep's
        return _failure(exc)


def _checked(verdict: dict[str, Any], seconds: float) -> Check:
    """The check as recorded: correctness's verdict (holding its gradients' in backward passes) and its cost."""
    gradients = verdict.get("gradients")
    return Check(
        **{**verdict, "gradients": GradientCheck(**gradients) if gradients else None}, seconds=round(seconds, 3)
    )


class Abandoned(Exception):
    """A cell failed on some ranks while others stayed stuck (in a transfer the failed ranks will never
    make): its ``outcome`` is what the ranks that arrived agree, and the worker must end, as only
    ending the processes frees the stuck ones. ``recorder``: this rank records the cell."""

    def __init__(self, outcome: Outcome, recorder: bool):
        super().__init__(outcome["error"].message)
        self.outcome, self.recorder = outcome, recorder
        self.record: Record | None = None  # the cell's record, once run_cell has made it


def _reduce(failures: list[tuple[int, Outcome]], world_size: int) -> Outcome:
    """The failure all ranks record: the first by precedence; across processes its message names the rank."""
    rank, chosen = min(failures, key=lambda item: _PRECEDENCE.index(item[1]["status"]))
    if world_size == 1:
        return chosen
    return {
        "status": chosen["status"],
        "error": Failure(chosen["error"].type, f"rank {rank}: {chosen['error'].message}"),
    }


def _plain(failure: Outcome | None) -> dict[str, str] | None:
    """A failure as plain JSON data, as ranks hand it to each other (:func:`_unplain` reads it back)."""
    if failure is None:
        return None
    return {"status": failure["status"], "type": failure["error"].type, "message": failure["error"].message}


def _unplain(plain: dict[str, str]) -> Outcome:
    return {"status": plain["status"], "error": Failure(plain["type"], plain["message"])}


def _agree(group: OneProcess, failure: Outcome | None) -> Outcome | None:
    """Every rank's failure so far, reduced to the one all ranks record (None if all are fine). Raises
    :class:`Abandoned` where a failure left other ranks stuck."""
    try:
        gathered = group.gather_failures(_plain(failure))
    except distributed.PeersStuck as stuck:
        failures = [(rank, _unplain(f)) for rank, f in stuck.arrived.items() if f]
        chosen = _reduce(failures, group.world_size)
        missing = ", ".join(map(str, stuck.missing))
        message = (
            f"{chosen['error'].message} (rank(s) {missing} did not get past the failure within "
            f"{distributed.STUCK_AFTER_S:g} s: the worker was ended to free them)"
        )
        raise Abandoned({**chosen, "error": Failure(chosen["error"].type, message)}, stuck.recorder) from None
    failures = [(rank, _unplain(f)) for rank, f in enumerate(gathered) if f]
    return _reduce(failures, group.world_size) if failures else None


def _combine_ranks(
    group: OneProcess, main: Projected
) -> tuple[Projected, tuple[RankFigures, ...] | None, tuple[GpuState, ...] | None]:
    """Rank 0's view of every rank's timing: the slowest rank per repetition, the largest memory
    figures; across processes, every rank's own; and every rank's GPU state where it was read."""
    everyone: list[Projected] = group.gather(main)
    gpus = tuple(rank.gpu for rank in everyone if rank.gpu is not None) or None
    if group.world_size == 1:
        return main, None, gpus
    samples = tuple(max(values) for values in zip(*(rank.samples_ms for rank in everyone)))

    def largest(key: str) -> float | None:
        values = [getattr(rank, key) for rank in everyone]
        return None if None in values else max(values)

    combined = replace(
        main,
        samples_ms=samples,
        stats=Stats(**summarize(samples)),
        peak_allocated_mib=largest("peak_allocated_mib"),
        held_mib=largest("held_mib"),
    )
    ranks = tuple(
        RankFigures(rank, data.stats.median_ms, data.peak_allocated_mib, data.held_mib)
        for rank, data in enumerate(everyone)
    )
    return combined, ranks, gpus


def _combine_traffic(group: OneProcess, traffic: dict[str, float] | None) -> Comm | None:
    """Every rank's bytes sent and time waiting in one instrumented call; the headline is the worst rank.

    None in one process, and when no rank sent through the clock: the implementation
    communicates in a way ringbench cannot see (inside a library), which must not read
    as "no traffic".
    """
    everyone = group.gather(traffic)
    if traffic is None or not any(data["transfers"] for data in everyone):
        return None
    ranks = tuple(
        RankTraffic(
            rank=rank,
            sent_bytes_per_call=data["sent_bytes"],
            wait_ms=data["wait_ms"],
            call_ms=data["call_ms"],
            wait_share=data["wait_ms"] / data["call_ms"] if data["call_ms"] > 0 else 0.0,
        )
        for rank, data in enumerate(everyone)
    )
    return Comm(
        sent_bytes_per_call=max(data["sent_bytes"] for data in everyone),
        wait_share=max(rank.wait_share for rank in ranks),
        ranks=ranks,
    )


@dataclass(frozen=True)
class _Checking:
    """What checking left behind for timing: this rank's sums, the gradient fed to backward passes
    (of this rank's rows), where gradients were sampled, and what the check cost."""

    sums: correctness.Sums | None
    grad_out: torch.Tensor | None
    sample: correctness.GradientSample | None
    seconds: float


def _check(
    cell: Cell,
    implementation: registry.Implementation,
    problem: registry.Problem,
    bench: registry.Bench,
    inputs: tuple[torch.Tensor, ...],
    seed: int,
) -> _Checking:
    """One call checked against the reference on the rows this rank holds (gradients too, in
    backward passes). Checked before it is timed; a wrong output is still timed, and marked."""
    reference, backward = implementation.reference, cell.pass_name != "forward"
    if reference is None and not backward:
        return _Checking(None, None, None, 0.0)
    output = bench.run()
    checking = time.perf_counter()  # what the check costs is reported beside what it found
    sums = correctness.partial_errors(reference, problem, output, bench.rows, seed) if reference else None
    grad_out, sample = None, None
    if backward:
        held = torch.arange(problem.seq_len, device=problem.device) if bench.rows is None else bench.rows
        grad_out = problem.inputs.rows("dout", held)
        grads = torch.autograd.grad(output, inputs, grad_out)
        if reference:
            sample = correctness.GradientSample.of(problem.inputs.shape, problem.device, seed)
            assert sums is not None, "the output's errors are found wherever there is a reference"
            sums = replace(sums, gradients=correctness.gradient_partials(reference, problem, grads, seed, bench.rows))
    return _Checking(sums, grad_out, sample, time.perf_counter() - checking)


def _phases(
    cell: Cell,
    implementation: registry.Implementation,
    group: OneProcess,
    budget: TimingBudget,
    seed: int,
    skip_oversized: bool,
    floor_mib: float,
    capacity_bytes: int | None,
    opened: list[registry.Bench],
) -> Outcome:
    """The cell's outcome on this rank; the bench setup returned goes into ``opened``.

    The bench is handed out that way, not returned, so that no caller's frame holds
    the whole inputs while a rank measures with only its shard.
    """
    device, failure = group.device, None
    if skip_oversized and (skip := _inputs_too_large(cell, device)):  # every rank decides alike
        return skip
    room = headroom(device, capacity_bytes)
    if room is not None:  # the least any rank has: setup's choices by it must agree
        room = -int(group.max(-room))
    try:
        problem = make_problem(cell, device, seed, group.rank, room)
        bench = _as_bench(implementation.setup(problem))
        opened.append(bench)
    except Exception as exc:  # any failure of user or library code is this cell's result, not the sweep's
        failure = _failure(exc)
    if failure := _agree(group, failure):
        return failure
    facts, inputs_mib, clock = problem.facts, _inputs_mib(cell), problem.comm
    inputs = bench.inputs or (problem.q, problem.k, problem.v)
    try:
        checking = _check(cell, implementation, problem, bench, inputs, seed)
        del problem  # whole inputs made in one process (problem.q) stay only where setup kept them
    except Exception as exc:
        failure = _failure(exc)
    if failure := _agree(group, failure):
        return failure
    check = None
    if checking.sums is not None:
        assert implementation.reference is not None, "sums are found only against a reference"
        tolerance = correctness.tolerance(cell.dtype, implementation.accumulates)
        verdict = correctness.verdict(
            implementation.reference, correctness.Sums.combine(group.gather(checking.sums)), tolerance, checking.sample
        )
        check = _checked(verdict, group.max(checking.seconds))
    try:
        timed = _pass_closure(cell.pass_name, bench.run, inputs, checking.grad_out)
        main = _time_and_measure(timed, device, budget, floor_mib, group)
        # A rank's share is a forward computation: it projects forward cells only.
        projected = (
            _time_and_measure(bench.rank_share, device, budget, floor_mib, group)
            if bench.rank_share and cell.pass_name == "forward"
            else None
        )
        traffic = clock.measure(timed) if clock else None
    except Exception as exc:
        failure = _failure(exc)
    if failure := _agree(group, failure):
        return failure
    combined, ranks, gpus = _combine_ranks(group, main)
    outcome = _outcome(cell, implementation, budget, facts, check, combined, projected, inputs_mib, ranks, gpus)
    return {**outcome, "comm": _combine_traffic(group, traffic)}


def _measure(
    cell: Cell,
    implementation: registry.Implementation,
    group: OneProcess,
    budget: TimingBudget,
    seed: int,
    skip_oversized: bool,
    floor_mib: float,
    capacity_bytes: int | None,
) -> Outcome:
    opened: list[registry.Bench] = []
    outcome = _phases(cell, implementation, group, budget, seed, skip_oversized, floor_mib, capacity_bytes, opened)
    # Every rank agrees on closing, including ranks whose setup failed (they have nothing to close).
    return _agree(group, _guarded(opened[0].close) if opened else None) or outcome


def _release(device: torch.device) -> None:
    # Runs after the except blocks have closed: an exception's traceback keeps the
    # failing frames, and with them their tensors, alive until then.
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        except RuntimeError:  # a sticky CUDA error: the cell's record says so, and the worker stops after it
            pass


def make_record(
    cell: Cell,
    outcome: Outcome,
    device: torch.device | None = None,
    started_at: str | None = None,
    seconds: float | None = None,
) -> Record:
    """The cell's record; what was not measured stays null."""
    return Record.of_cell(
        cell,
        device=None if device is None else str(device),
        started_at=started_at,
        duration_s=None if seconds is None else round(seconds, 3),
        **outcome,
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_cell(
    cell: Cell,
    implementation: registry.Implementation,
    group: OneProcess,
    budget: TimingBudget,
    seed: int,
    skip_oversized: bool = True,
    capacity_bytes: int | None = None,
) -> Record:
    """Measure one cell on every rank of ``group`` (all ranks call this) and return the agreed record;
    never raises for a failing implementation, but for :class:`Abandoned` (with its record) where a
    failure left ranks stuck.

    With ``skip_oversized`` a cell whose inputs alone exceed the device's memory is
    recorded as skipped without allocating anything. ``capacity_bytes`` is what the
    process may allocate (``memory.Cap``), from which setup learns its headroom.
    """
    group.barrier()
    started_at, start = _now(), time.perf_counter()
    try:
        floor_mib = allocated_mib(group.device)
        outcome = _measure(cell, implementation, group, budget, seed, skip_oversized, floor_mib, capacity_bytes)
    except Abandoned as abandoned:
        abandoned.record = make_record(cell, abandoned.outcome, group.device, started_at, time.perf_counter() - start)
        raise
    _release(group.device)
    group.barrier()
    return make_record(cell, outcome, group.device, started_at, time.perf_counter() - start)
