"""Running a plan: create the run folder, stamp it, measure every cell, append each record.

Each record is on disk before the next cell starts, so an interruption (Ctrl-C,
a killed job) keeps every finished cell.

Cells of world size 1 run in this process. For each larger world size the runner
starts that many processes through PyTorch's launcher (``torch.distributed.run``);
they run all of that world size's cells and rank 0 appends the records. A launch
that dies leaves its cell in flight recorded as ``crashed``, and the remaining
cells of that world size are launched again.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ringbench import distributed, env, records
from ringbench.config import Sweep
from ringbench.errors import ConfigError
from ringbench.plan import Cell, Plan
from ringbench.modes import matmul_peak_tflops
from ringbench.worker import DTYPES, make_record, run_cell, run_cell_on_ranks

LOG_TAIL_CHARS = 2000


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


def _start(sweep: Sweep, plan: Plan, source: str, device: torch.device, output_root: Path) -> Path:
    environment = env.snapshot(device)
    # Measured first, on an idle device: the ceiling every cell's TFLOP/s is set against.
    environment["matmul_peak_tflops"] = {} if device.type != "cuda" else {
        dtype: matmul_peak_tflops(device, DTYPES[dtype]) for dtype in sweep.dtypes}
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
    return run_dir


def _finish(run_dir: Path) -> None:
    """Stamp the GPUs' state again at the end: clocks or throttling that moved during the run show up."""
    meta = records.read_run(run_dir)
    meta["environment"]["gpu_state_end"] = env.gpu_state() if meta["environment"]["gpus"] else []
    records.write_json_atomic(run_dir / records.RUN_FILE, meta)


def _crashed(cell: Cell, message: str) -> dict[str, Any]:
    return make_record(cell, {"status": records.CRASHED, "error": {"type": "Crashed", "message": message}})


def _launch(world_size: int, cells: list[Cell], run_dir: Path, writer: records.RecordWriter, result: RunResult,
            observer: Observer, first_index: int) -> None:
    """Run one world size's cells in launcher-started processes until each has a record."""
    by_id = {cell.id: cell for cell in cells}
    pending = list(cells)
    log_path = run_dir / f"launch-{world_size}.log"

    def finished(record: dict[str, Any]) -> None:
        pending.remove(by_id[record["cell_id"]])
        observer.cell_finished(first_index + len(cells) - len(pending) - 1, by_id[record["cell_id"]], record)
        if pending:
            observer.cell_started(first_index + len(cells) - len(pending), pending[0])

    observer.cell_started(first_index, pending[0])
    while pending:
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
                 "-m", "ringbench", "ranks", str(run_dir)],
                stdout=log, stderr=subprocess.STDOUT,
            )
            while True:
                exited = process.poll() is not None  # read before the records, so none written at exit is missed
                for record in _new_records(run_dir, result):
                    if record["cell_id"] in by_id:
                        finished(record)
                if exited:
                    break
                time.sleep(0.2)
        if pending:
            tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            crashed = _crashed(pending[0], f"the {world_size}-process launch exited with code {process.returncode} "
                                           f"during this cell; its output ended: {tail}")
            writer.append(crashed)
            result.records.append(crashed)
            finished(crashed)


def _new_records(run_dir: Path, result: RunResult) -> list[dict[str, Any]]:
    """Records appended by other processes since the last look."""
    stored = list(records.read_records(run_dir))
    new = stored[len(result.records):]
    result.records.extend(new)
    return new


def _resume(run_dir: Path, sweep: Sweep, plan: Plan, source: str, retry_failed: bool) -> None:
    """Check that the run folder belongs to this sweep, mend a cut-off record, note the resumption."""
    meta = records.read_run(run_dir)
    if meta["config_hash"] != sweep.hash or [p["cell_id"] for p in meta["planned"]] != [c.id for c in plan.cells]:
        raise ConfigError(source, "", f"does not describe the sweep in {run_dir} (its config has changed since)")
    repaired = records.drop_partial_line(run_dir)
    meta.setdefault("resumed", []).append({
        "date_utc": env.snapshot_time(), "retry_failed": retry_failed, "dropped_partial_record": repaired,
    })
    records.write_json_atomic(run_dir / records.RUN_FILE, meta)


def run(sweep: Sweep, plan: Plan, source: str, device: torch.device, observer: Observer, output_root: Path,
        resume: Path | None = None, retry_failed: bool = False) -> RunResult:
    """Run the plan in a new run folder, or, with ``resume``, the cells a stopped run has not finished."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if resume:
        _resume(resume, sweep, plan, source, retry_failed)
    run_dir = resume or _start(sweep, plan, source, device, output_root)
    result = RunResult(run_dir, records=list(records.read_records(run_dir)))
    done = records.done_ids(run_dir, retry_failed)
    plan = Plan(tuple(cell for cell in plan.cells if cell.id not in done), plan.excluded)
    observer.started(run_dir, len(plan.cells))
    local = [cell for cell in plan.cells if cell.world_size == 1]
    with records.RecordWriter(run_dir) as writer:
        try:
            for index, cell in enumerate(local):
                observer.cell_started(index, cell)
                record = run_cell(cell, device, sweep.timing, sweep.seed)
                writer.append(record)
                result.records.append(record)
                observer.cell_finished(index, cell, record)
            done = len(local)
            for world_size in sorted({cell.world_size for cell in plan.cells} - {1}):
                cells = [cell for cell in plan.cells if cell.world_size == world_size]
                _launch(world_size, cells, run_dir, writer, result, observer, done)
                done += len(cells)
        except KeyboardInterrupt:
            result.interrupted = True
    _finish(run_dir)
    # The file is the truth: an interrupt can fall between writing a record and noting it.
    result.records = list(records.read_records(run_dir))
    return result


def serve_ranks(sweep: Sweep, plan: Plan, run_dir: Path | None, source: str, output_root: Path) -> Path:
    """Run this group's cells on every rank (all ranks call this); rank 0 alone writes.

    ``run_dir`` is given when ringbench launched the group itself; under a user's own
    launcher it is None and rank 0 creates the run folder.
    """
    group = distributed.join(resolve_device(sweep.device, source).type)
    try:
        if group.is_leader and run_dir is None:
            run_dir = _start(sweep, plan, source, group.device, output_root)
        run_dir = Path(distributed.broadcast(str(run_dir) if group.is_leader else None))
        # A launch after a crash, or for a resumed run, runs only what is not done yet.
        retry = (records.read_run(run_dir).get("resumed") or [{}])[-1].get("retry_failed", False)
        done = distributed.broadcast(records.done_ids(run_dir, retry) if group.is_leader else None)
        cells = [cell for cell in plan.cells if cell.world_size == group.world_size and cell.id not in done]
        writer = records.RecordWriter(run_dir) if group.is_leader else None
        for cell in cells:
            record = run_cell_on_ranks(cell, group, sweep.timing, sweep.seed)
            if writer:
                writer.append(record)
        if writer:
            writer.close()
            _finish(run_dir)
        return run_dir
    finally:
        distributed.leave()
