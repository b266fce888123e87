"""A run folder's life on the run side: created and stamped at the start, stamped again at the
end, and the notes the supervisor and its workers pass through it while cells run.

- ``pending-N.json``: the cells of world size N a worker is to run, in order (the supervisor's).
- ``inflight-N.json``: the cell a worker of world size N has started, and when (the worker's);
  the supervisor's clock for timeouts, and where it looks for whom to blame when a worker dies.

Both go once every cell of the world size has its record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ringbench import records
from ringbench.run import env
from ringbench.run.modes import matmul_peak_tflops
from ringbench.run.pipeline import TORCH_DTYPES
from ringbench.sweep.config import Sweep
from ringbench.sweep.plan import Plan
from ringbench.vocabulary import Cell


def start(sweep: Sweep, plan: Plan, source: str, device: torch.device, output_root: Path, threads: int) -> Path:
    """A new run folder holding run.json: the config, the plan, the roles, the environment."""
    environment = env.snapshot(device, threads, Path(source).resolve().parent)
    # Measured first, on an idle device: the ceiling every cell's TFLOP/s is set against.
    environment["matmul_peak_tflops"] = (
        {}
        if device.type != "cuda"
        else {dtype: matmul_peak_tflops(device, TORCH_DTYPES[dtype]) for dtype in sweep.dtypes}
    )
    run_dir = records.create_run_dir(output_root, environment["git"]["commit"])
    records.write_json_atomic(
        run_dir / records.RUN_FILE,
        {
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
    return run_dir


def finish(run_dir: Path) -> None:
    """Stamp the GPUs' state again at the end: clocks or throttling that moved during the run show up."""
    meta = records.read_run(run_dir)
    meta["environment"]["gpu_state_end"] = env.gpu_state() if meta["environment"]["gpus"] else []
    meta["environment"]["host_load_end"] = env.host_load()
    records.write_json_atomic(run_dir / records.RUN_FILE, meta)


def pending_path(run_dir: Path, world_size: int) -> Path:
    return run_dir / f"pending-{world_size}.json"


def write_pending(run_dir: Path, world_size: int, cells: list[Cell]) -> Path:
    path = pending_path(run_dir, world_size)
    records.write_json_atomic(path, {"cell_ids": [cell.id for cell in cells]})
    return path


def read_pending(path: Path, plan: Plan) -> list[Cell]:
    by_id = {cell.id: cell for cell in plan.cells}
    return [by_id[cell_id] for cell_id in json.loads(path.read_text())["cell_ids"]]


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
