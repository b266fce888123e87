"""A run folder's life on the run side: created and stamped at the start, stamped again at the
end, and the notes the supervisor and its workers pass through it while cells run.

- ``pending-N.json``: the jobs of world size N a worker is to run, in order (the supervisor's):
  cells, and searches with the outcomes of their probes so far (``run.jobs``).
- ``inflight-N.json``: the cell a worker of world size N has started, and when (the worker's);
  the supervisor's clock for timeouts, and where it looks for whom to blame when a worker dies.

Both go once every cell of the world size has its record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ringbench import records
from ringbench.attention.models import MemoryModel
from ringbench.run import env, jobs
from ringbench.run.memory import Cap
from ringbench.run.modes import matmul_peak_tflops
from ringbench.run.pipeline import TORCH_DTYPES
from ringbench.sweep.config import Sweep
from ringbench.sweep.longest import predicted_longest
from ringbench.sweep.plan import Plan
from ringbench.vocabulary import Cell


def _before_setup(model: MemoryModel) -> Callable[[Cell], int | None]:
    """A memory model given no facts: what it assumes before setup has said which path it took."""
    return lambda cell: model(cell, {})


def _searches(plan: Plan, capacity_bytes: int | None) -> list[dict[str, Any]]:
    """The planned searches as run.json keeps them, each with its memory model's prediction where
    there is one: where the model covers the search's probes, on a device whose capacity is known.
    The report cannot reach the models (it never imports the implementations), so the prediction
    is made here. A model may read the facts setup leaves; before any probe there are none, so it
    predicts the path it assumes without them."""
    stored = []
    for search in plan.searches:
        implementation = plan.implementations[search.cell.implementation]
        model, kept = implementation.memory_model, implementation.setup_memory or (lambda cell: 0)
        predicted = (
            predicted_longest(search, _before_setup(model), kept, capacity_bytes) if model and capacity_bytes else None
        )
        stored.append({"search_id": search.id, **search.params(), "label": search.cell.label, "predicted": predicted})
    return stored


def start(
    sweep: Sweep,
    plan: Plan,
    source: str,
    device: torch.device,
    output_root: Path,
    threads: int,
    predictions: dict[str, Any] | None = None,
) -> Path:
    """A new run folder holding run.json: the config, the plan, the roles, the environment; and the
    ``predictions`` made before the run, where given."""
    environment = env.snapshot(device, threads, Path(source).resolve().parent)
    # Measured first, on an idle device: the ceiling every cell's TFLOP/s is set against.
    environment["matmul_peak_tflops"] = (
        {}
        if device.type != "cuda"
        else {dtype: matmul_peak_tflops(device, TORCH_DTYPES[dtype]) for dtype in sweep.dtypes}
    )
    run_dir = records.create_run_dir(output_root, environment["git"]["commit"])
    cap = Cap.of(sweep.memory_cap_gib, device)
    records.write_json_atomic(
        run_dir / records.RUN_FILE,
        {
            # Written only where the config asks for them, as older runs lack them.
            **({"searches": _searches(plan, cap.capacity_bytes)} if plan.searches else {}),
            **({"memory_cap": {"gib": sweep.memory_cap_gib, "note": cap.note}} if sweep.memory_cap_gib else {}),
            "schema_version": records.SCHEMA_VERSION,
            "config_source": source,  # as given, for the report
            "config_file": str(Path(source).resolve()),  # absolute, so a resume works from any folder
            "config_hash": sweep.hash,
            "config": sweep.as_dict(),
            "environment": environment,
            "planned": [{"cell_id": cell.id, **cell.params()} for cell in plan.cells],
            "excluded": [exclusion.as_dict() for exclusion in plan.excluded],
            "roles": plan.roles(),
        },
    )
    if predictions is not None:
        records.write_json_atomic(run_dir / records.PREDICTIONS_FILE, predictions)
    return run_dir


def finish(run_dir: Path) -> None:
    """Stamp the GPUs' state again at the end: clocks or throttling that moved during the run show up."""
    meta = records.read_run(run_dir)
    meta["environment"]["gpu_state_end"] = env.gpu_state() if meta["environment"]["gpus"] else []
    meta["environment"]["host_load_end"] = env.host_load()
    records.write_json_atomic(run_dir / records.RUN_FILE, meta)


def pending_path(run_dir: Path, world_size: int) -> Path:
    return run_dir / f"pending-{world_size}.json"


def write_pending(run_dir: Path, world_size: int, pending: list[jobs.Job]) -> Path:
    path = pending_path(run_dir, world_size)
    records.write_json_atomic(path, {"jobs": [job.as_json() for job in pending]})
    return path


def read_pending(path: Path, plan: Plan) -> list[jobs.Job]:
    return jobs.from_json(json.loads(path.read_text())["jobs"], plan)


def _inflight_path(run_dir: Path, world_size: int) -> Path:
    return run_dir / f"inflight-{world_size}.json"


def mark_inflight(run_dir: Path, cell: Cell) -> None:
    """The worker's note of the cell it starts, and when."""
    records.write_json_atomic(_inflight_path(run_dir, cell.world_size), {"cell_id": cell.id, "started": time.time()})


def inflight(run_dir: Path, world_size: int) -> dict[str, Any]:
    """The worker's last note (``cell_id``, ``started``), or {} where there is none (yet)."""
    try:
        return json.loads(_inflight_path(run_dir, world_size).read_text())
    except (OSError, ValueError):
        return {}


def clear_notes(run_dir: Path, world_size: int | None = None) -> None:
    """Remove the notes of one world size (every one by default): nothing is pending or in flight."""
    for pattern in ("pending-{}.json", "inflight-{}.json"):
        for path in run_dir.glob(pattern.format("*" if world_size is None else world_size)):
            path.unlink(missing_ok=True)
