"""Running a plan: create the run folder, stamp it, measure every cell, append each record.

Each record is on disk before the next cell starts, so an interruption (Ctrl-C,
a killed job) keeps every finished cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ringbench import env, records
from ringbench.config import Sweep
from ringbench.errors import ConfigError
from ringbench.plan import Cell, Plan
from ringbench.worker import run_cell


class Observer(Protocol):
    """What the runner reports as it goes (the CLI draws a progress bar from it)."""

    def started(self, run_dir: Path, total: int) -> None: ...

    def cell_started(self, index: int, cell: Cell) -> None: ...

    def cell_finished(self, index: int, cell: Cell, record: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


def resolve_device(spec: str, source: str) -> torch.device:
    """Turn the config's device into a usable torch.device, or fail before anything is written."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(source, "device", f"'{spec}' requested but no CUDA device is available")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(source, "device", f"'{spec}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        device = torch.device("cuda", index)
    return device


def run(sweep: Sweep, plan: Plan, source: str, device: torch.device, observer: Observer, output_root: Path) -> RunResult:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    environment = env.snapshot(device)
    run_dir = records.create_run_dir(output_root, environment["git"]["commit"])
    records.write_json_atomic(run_dir / records.RUN_FILE, {
        "schema_version": records.SCHEMA_VERSION,
        "config_source": source,
        "config_hash": sweep.hash,
        "config": sweep.as_dict(),
        "environment": environment,
        "planned": [{"cell_id": cell.id, **cell.params()} for cell in plan.cells],
        "excluded": [exclusion.as_dict() for exclusion in plan.excluded],
    })
    result = RunResult(run_dir)
    observer.started(run_dir, len(plan.cells))
    with records.RecordWriter(run_dir) as writer:
        try:
            for index, cell in enumerate(plan.cells):
                observer.cell_started(index, cell)
                record = run_cell(cell, device, sweep.timing, sweep.seed)
                writer.append(record)
                result.records.append(record)
                observer.cell_finished(index, cell, record)
        except KeyboardInterrupt:
            result.interrupted = True
    return result
