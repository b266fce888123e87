"""Running one cell: inputs → setup → check → timing → memory → a record (a plain dict).

Failures never escape: out-of-memory becomes status ``oom``, any other exception
status ``error``, an output beyond tolerance status ``wrong``; the cell's tensors
are released before the next cell starts.
"""

from __future__ import annotations

import gc
import time
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from ringbench import correctness, registry, records
from ringbench.config import TimingBudget
from ringbench.memory import MIB, measure_peak
from ringbench.models import dense_flops
from ringbench.plan import Cell
from ringbench.stats import summarize
from ringbench.timing import measure

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def make_problem(cell: Cell, device: torch.device, seed: int) -> registry.Problem:
    """Random q, k, v of the cell's shape; the same seed gives every implementation the same inputs."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (cell.batch_size, cell.heads, cell.seq_len, cell.head_dim)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=DTYPES[cell.dtype]) for _ in range(3))
    return registry.Problem(q=q, k=k, v=v, causal=cell.causal, ring_size=cell.ring_size, options=dict(cell.options))


def _describe(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


def _as_bench(prepared: Callable[[], torch.Tensor] | registry.Bench) -> registry.Bench:
    return prepared if isinstance(prepared, registry.Bench) else registry.Bench(run=prepared)


def _timing_fields(fn: Callable[[], object], device: torch.device, budget: TimingBudget) -> dict[str, Any]:
    timing = measure(fn, device, budget)
    memory = measure_peak(fn, device)
    return {
        "warmup_ms": list(timing.warmup_ms),
        "samples_ms": list(timing.samples_ms),
        "stats": summarize(timing.samples_ms),
        "peak_allocated_mib": memory.peak_allocated_mib if memory else None,
        "peak_reserved_mib": memory.peak_reserved_mib if memory else None,
    }


def _measure(cell: Cell, device: torch.device, budget: TimingBudget, seed: int) -> dict[str, Any]:
    implementation = registry.get(cell.implementation)
    try:
        problem = make_problem(cell, device, seed)
        bench = _as_bench(implementation.setup(problem))
        # Checked before it is timed; a wrong output is still timed, and marked.
        check = None
        if implementation.reference != "none":
            output = bench.run()
            check = correctness.check(implementation.reference, problem, output, cell.dtype, seed)
            del output
        # Timing first: it warms the implementation up, so the memory pass sees only
        # what one steady-state call allocates, not one-off workspaces.
        main = _timing_fields(bench.run, device, budget)
        projected = _timing_fields(bench.rank_share, device, budget) if bench.rank_share else None
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": records.OOM, "error": _describe(exc)}
    except Exception as exc:  # any failure of user or library code is this cell's result, not the sweep's
        return {"status": records.ERROR, "error": _describe(exc)}
    stats = main["stats"]
    seconds = stats["median_ms"] / 1e3
    flops = implementation.flops(cell) if implementation.flops else dense_flops(cell)
    modelled = implementation.memory_model(cell) if implementation.memory_model else None
    return {
        "status": records.WRONG if check and not check["passed"] else records.OK,
        "facts": problem.facts,
        "check": check,
        "warmup_ms": main["warmup_ms"],
        "samples_ms": main["samples_ms"],
        "stats": stats,
        "memory": {
            "inputs_mib": sum(t.numel() * t.element_size() for t in (problem.q, problem.k, problem.v)) / MIB,
            "peak_allocated_mib": main["peak_allocated_mib"],
            "peak_reserved_mib": main["peak_reserved_mib"],
            "modelled_mib": modelled / MIB if modelled is not None else None,
        },
        "projected": projected,
        "flops": flops,
        "tflops": flops / seconds / 1e12,
        "tokens_per_s": cell.batch_size * cell.seq_len / seconds,
    }


def _release(device: torch.device) -> None:
    # Runs after the except blocks have closed: an exception's traceback keeps the
    # failing frames, and with them their tensors, alive until then.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_cell(cell: Cell, device: torch.device, budget: TimingBudget, seed: int) -> dict[str, Any]:
    """Measure one cell and return its record; never raises for a failing implementation."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    outcome = _measure(cell, device, budget, seed)
    _release(device)
    return {
        "schema_version": records.SCHEMA_VERSION,
        "cell_id": cell.id,
        **cell.params(),
        "device": str(device),
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - start, 3),
        "error": None,
        "facts": {},
        "warmup_ms": [],
        "samples_ms": [],
        "check": None,
        "stats": None,
        "memory": None,
        "projected": None,
        "flops": None,
        "tflops": None,
        "tokens_per_s": None,
        **outcome,
    }
