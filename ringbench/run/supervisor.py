"""Running a plan: create the run folder, stamp it, measure every cell, append each record.

Each record is on disk before the next cell starts, so an interruption (Ctrl-C,
a killed job) keeps every finished cell.

Cells never run in the runner's own process. For each world size it starts a
long-lived worker — one process (``ringbench ranks``) for world size 1, that many
processes through PyTorch's launcher (``torch.distributed.run``) above — which
runs all of that world size's cells, marks each one in flight, and (rank 0)
appends the records. The runner watches: a worker that dies (segfault, CUDA
fault, ``os._exit``, killed) leaves its cell in flight recorded as ``crashed``;
a cell in flight longer than ``cell_timeout_s`` has its worker killed and is
recorded as ``timeout``; either way, with the tail of the worker's output, and a
fresh worker takes the remaining cells. Workers die with the runner, so none
writes on behind a stopped run.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ringbench import records
from ringbench.run import distributed, env
from ringbench.sweep.config import Sweep
from ringbench.errors import ConfigError
from ringbench.schema import Failure, Record
from ringbench.sweep.plan import Plan
from ringbench.vocabulary import Cell
from ringbench.run.modes import matmul_peak_tflops, prime_libraries
from ringbench.run.pipeline import DTYPES, make_record, run_cell, run_cell_on_ranks

LOG_TAIL_CHARS = 2000


class Observer(Protocol):
    """What the runner reports as it goes (the CLI draws a progress bar from it)."""

    def started(self, run_dir: Path, total: int) -> None: ...

    def cell_started(self, index: int, cell: Cell) -> None: ...

    def cell_finished(self, index: int, cell: Cell, record: Record) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    records: list[Record] = field(default_factory=list)
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


def _start(sweep: Sweep, plan: Plan, source: str, device: torch.device, output_root: Path, threads: int) -> Path:
    environment = env.snapshot(device, threads, Path(source).resolve().parent)
    # Measured first, on an idle device: the ceiling every cell's TFLOP/s is set against.
    environment["matmul_peak_tflops"] = {} if device.type != "cuda" else {
        dtype: matmul_peak_tflops(device, DTYPES[dtype]) for dtype in sweep.dtypes}
    run_dir = records.create_run_dir(output_root, environment["git"]["commit"])
    records.write_json_atomic(run_dir / records.RUN_FILE, {
        "schema_version": records.SCHEMA_VERSION,
        "config_source": source,  # as given, for the report
        "config_file": str(Path(source).resolve()),  # absolute, so a resume works from any folder
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
    meta["environment"]["host_load_end"] = env.host_load()
    records.write_json_atomic(run_dir / records.RUN_FILE, meta)


def _failed(cell: Cell, status: str, message: str) -> Record:
    return make_record(cell, {"status": status, "error": Failure(status.capitalize(), message)})


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies, SIGKILL included (Linux only),
    so no worker outlives a stopped runner and appends records behind a resumed run."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT


def _first_interrupt(*_: object) -> None:
    """Ctrl-C: stop the sweep, keeping what is stored; a second Ctrl-C ends the process at once.
    Ending there loses nothing: records are fsynced line by line and run.json is replaced whole."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
    raise KeyboardInterrupt


def _inflight_path(run_dir: Path, world_size: int) -> Path:
    return run_dir / f"inflight-{world_size}.json"


def mark_inflight(run_dir: Path, cell: Cell) -> None:
    """The worker's note of the cell it starts, and when: the runner's clock for timeouts."""
    records.write_json_atomic(_inflight_path(run_dir, cell.world_size), {"cell_id": cell.id, "started": time.time()})


def _worker_command(world_size: int, run_dir: Path, threads: int) -> list[str]:
    worker = ["-m", "ringbench", "ranks", str(run_dir), "--threads", str(threads)]
    if world_size == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}", *worker]


def _stop(process: subprocess.Popen) -> None:
    """Kill a worker and everything it started (the launcher's ranks)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


# After its last cell a worker only tears down; one that takes longer than this is stopped.
TEARDOWN_S = 60


def _launch(world_size: int, cells: list[Cell], run_dir: Path, writer: records.RecordWriter, result: RunResult,
            observer: Observer, first_index: int, timeout_s: float, threads: int) -> None:
    """Run one world size's cells in workers until each has a record."""
    by_id = {cell.id: cell for cell in cells}
    pending = list(cells)
    log_path = run_dir / f"worker-{world_size}.log"

    def finished(record: Record) -> None:
        pending.remove(by_id[record.cell_id])
        observer.cell_finished(first_index + len(cells) - len(pending) - 1, by_id[record.cell_id], record)
        if pending:
            observer.cell_started(first_index + len(cells) - len(pending), pending[0])

    def mark() -> dict[str, Any]:
        try:
            return json.loads(_inflight_path(run_dir, world_size).read_text())
        except (OSError, ValueError):
            return {}

    def in_flight_for(since: float) -> float:
        """Seconds the first pending cell has run, by the worker's mark (else since the last progress)."""
        current = mark()
        return time.time() - (current["started"] if current.get("cell_id") == pending[0].id else since)

    observer.cell_started(first_index, pending[0])
    while pending:
        timed_out, before = False, len(pending)
        with log_path.open("ab") as log:
            process = subprocess.Popen(_worker_command(world_size, run_dir, threads), stdout=log, stderr=subprocess.STDOUT,
                                       env=env.worker_environment(), start_new_session=True, preexec_fn=die_with_parent)
            try:
                progress = time.time()
                while pending:
                    exited = process.poll() is not None  # read before the records, so none written at exit is missed
                    new = [record for record in _new_records(run_dir, result) if record.cell_id in by_id]
                    for record in new:
                        finished(record)
                        progress = time.time()
                    if exited or not pending:
                        break
                    if in_flight_for(progress) > timeout_s:
                        timed_out = True
                        _stop(process)
                        break
                    time.sleep(0.2)
                process.wait(TEARDOWN_S)
            except subprocess.TimeoutExpired:
                _stop(process)
            except BaseException:  # Ctrl-C included: no worker is left running
                _stop(process)
                raise
        # A worker may stop between cells (after a CUDA fault it recorded, its context is
        # useless): a fresh one goes on. It is to blame only if it died in a cell, or
        # before finishing any (so a worker that cannot start never loops).
        if pending and mark().get("cell_id") != pending[0].id and len(pending) < before:
            continue
        if pending:
            tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            if timed_out:
                failed = _failed(pending[0], records.TIMEOUT, f"the cell ran past cell_timeout_s ({timeout_s:g} s) "
                                                              f"and its worker was stopped; its output ended: {tail}")
            else:
                when = "during this cell" if mark().get("cell_id") == pending[0].id else "before starting this cell"
                failed = _failed(pending[0], records.CRASHED, f"the worker exited with code {process.returncode} "
                                                              f"{when}; its output ended: {tail}")
            writer.append(failed)
            result.records.append(failed)
            finished(failed)
    _inflight_path(run_dir, world_size).unlink(missing_ok=True)  # every cell has its record: nothing is in flight


def _new_records(run_dir: Path, result: RunResult) -> list[Record]:
    """Records appended by the workers since the last look."""
    stored = list(records.read_records(run_dir))
    new = stored[len(result.records):]
    result.records.extend(new)
    return new


def _resume(run_dir: Path, sweep: Sweep, plan: Plan, source: str, retry_failed: bool, threads: int) -> None:
    """Check that the run folder belongs to this sweep, mend a cut-off record, note the resumption."""
    meta = records.read_run(run_dir)
    if meta["config_hash"] != sweep.hash or [p["cell_id"] for p in meta["planned"]] != [c.id for c in plan.cells]:
        raise ConfigError(source, "", f"does not describe the sweep in {run_dir} (its config has changed since)")
    repaired = records.drop_partial_line(run_dir)
    meta.setdefault("resumed", []).append({
        "date_utc": env.snapshot_time(), "retry_failed": retry_failed, "dropped_partial_record": repaired,
        "threads": threads,
    })
    records.write_json_atomic(run_dir / records.RUN_FILE, meta)


def run(sweep: Sweep, plan: Plan, source: str, device: torch.device, observer: Observer, output_root: Path,
        resume: Path | None = None, retry_failed: bool = False, threads: int | None = None) -> RunResult:
    """Run the plan in a new run folder, or, with ``resume``, the cells a stopped run has not finished.

    ``threads``, the workers' intra-op thread count, overrides the config's (default: physical cores).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = threads or sweep.threads or env.default_threads()
    if resume:
        _resume(resume, sweep, plan, source, retry_failed, threads)
    run_dir = resume or _start(sweep, plan, source, device, output_root, threads)
    result = RunResult(run_dir, records=list(records.read_records(run_dir)))
    done = records.done_ids(run_dir, retry_failed)
    plan = Plan(tuple(cell for cell in plan.cells if cell.id not in done), plan.excluded)
    observer.started(run_dir, len(plan.cells))
    previous = signal.signal(signal.SIGINT, _first_interrupt)
    try:
        with records.RecordWriter(run_dir) as writer:
            try:
                done = 0
                for world_size in sorted({cell.world_size for cell in plan.cells}):
                    cells = [cell for cell in plan.cells if cell.world_size == world_size]
                    _launch(world_size, cells, run_dir, writer, result, observer, done, sweep.cell_timeout_s, threads)
                    done += len(cells)
            except KeyboardInterrupt:
                result.interrupted = True
                for mark in run_dir.glob("inflight-*.json"):  # the stopped cells have no record: nothing is in flight
                    mark.unlink(missing_ok=True)
        _finish(run_dir)
    finally:
        signal.signal(signal.SIGINT, previous)
    # The file is the truth: an interrupt can fall between writing a record and noting it.
    result.records = list(records.read_records(run_dir))
    return result


def _pending(run_dir: Path, plan: Plan, world_size: int) -> list[Cell]:
    """This world size's cells that have no record yet (after a crash, or in a resumed run)."""
    retry = (records.read_run(run_dir).get("resumed") or [{}])[-1].get("retry_failed", False)
    done = records.done_ids(run_dir, retry)
    return [cell for cell in plan.cells if cell.world_size == world_size and cell.id not in done]


def _usable(device: torch.device) -> bool:
    """False after a sticky CUDA error (an illegal access, a device-side assert): every later
    call in this process would fail, whatever the cell."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return True
    except RuntimeError:
        return False


def _prepare(device: torch.device, sweep: Sweep, threads: int, world_size: int) -> None:
    """Threads and libraries set up before the first cell, alike for every cell."""
    # The ranks of one host share its cores: each takes its part.
    torch.set_num_threads(max(1, threads // world_size))
    print(f"{torch.get_num_threads()} intra-op thread(s)", flush=True)
    prime_libraries(device, [DTYPES[dtype] for dtype in sweep.dtypes])


def serve(sweep: Sweep, plan: Plan, run_dir: Path | None, source: str, output_root: Path,
          threads: int | None = None) -> Path:
    """A worker: run this world size's pending cells, marking each in flight; rank 0 alone writes.

    In one process (world size 1) ``run_dir`` is the runner's. Across processes,
    ``run_dir`` is None under a user's own launcher, and rank 0 creates the run folder.
    ``threads`` is the intra-op thread count of the host, shared by the ranks on it.
    """
    die_with_parent()
    print(f"ringbench worker {os.getpid()} started", flush=True)  # one line per start in the worker's log
    threads = threads or sweep.threads or env.default_threads()
    if not distributed.launched():
        device = resolve_device(sweep.device, source)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _prepare(device, sweep, threads, 1)
        with records.RecordWriter(run_dir) as writer:
            for cell in _pending(run_dir, plan, 1):
                mark_inflight(run_dir, cell)
                writer.append(run_cell(cell, device, sweep.timing, sweep.seed, sweep.skip_oversized_inputs))
                if not _usable(device):
                    print("the CUDA context is broken (a sticky error); a fresh worker takes the next cells", flush=True)
                    os._exit(0)  # its teardown could hang on the broken context; the record is already on disk
        return run_dir
    group = distributed.join(resolve_device(sweep.device, source).type)
    try:
        _prepare(group.device, sweep, threads, distributed.local_world_size())
        created = group.is_leader and run_dir is None
        if created:
            run_dir = _start(sweep, plan, source, group.device, output_root, threads)
        run_dir = Path(distributed.broadcast(str(run_dir) if group.is_leader else None))
        cells = distributed.broadcast(_pending(run_dir, plan, group.world_size) if group.is_leader else None)
        writer = records.RecordWriter(run_dir) if group.is_leader else None
        for cell in cells:
            if writer:
                mark_inflight(run_dir, cell)
            record = run_cell_on_ranks(cell, group, sweep.timing, sweep.seed, sweep.skip_oversized_inputs)
            if writer:
                writer.append(record)
        if writer:
            writer.close()
        if created:
            _finish(run_dir)
        return run_dir
    finally:
        distributed.leave()
