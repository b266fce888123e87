"""Running a plan: create the run folder, stamp it, have workers measure every cell, keep each record.

Each record is on disk before the next cell starts, so an interruption (Ctrl-C,
a killed job) keeps every finished cell.

Cells never run in the supervisor's own process. For each world size it starts a
long-lived worker (``ringbench.run.worker``) — one process for world size 1, that
many processes through PyTorch's launcher (``torch.distributed.run``) above — hands
it the jobs to run in a pending file (cells, and longest-sequence searches, whose
next probe the supervisor knows from the records as the worker does), and follows
the records it appends. A worker that dies (segfault, CUDA fault, ``os._exit``, killed) leaves the cell it
marked in flight recorded as ``crashed``; a cell in flight longer than
``cell_timeout_s`` has its worker killed and is recorded as ``timeout``; either
way with the tail of the worker's output (``blame``), and a fresh worker takes
the remaining cells. Workers die with the supervisor, so none writes on behind a
stopped run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ringbench import records
from ringbench.errors import ConfigError
from ringbench.run import distributed, env, folder, jobs, worker
from ringbench.run.pipeline import make_record
from ringbench.schema import Failure, Record
from ringbench.sweep.config import Sweep
from ringbench.sweep.plan import Plan
from ringbench.vocabulary import Cell, implementation_label

LOG_TAIL_CHARS = 2000
# After its last cell a worker only tears down; one that takes longer than this is stopped.
TEARDOWN_S = 60
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT


class Observer(Protocol):
    """What the supervisor reports as it goes (the CLI draws a progress bar from it)."""

    def started(self, run_dir: Path, total: int | None) -> None: ...  # None: not known (searches)

    def cell_started(self, index: int, cell: Cell) -> None: ...

    def cell_finished(self, index: int, cell: Cell, record: Record) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    records: list[Record] = field(default_factory=list)
    interrupted: bool = False


@dataclass(frozen=True)
class WorkerEnd:
    """How one launch of a worker ended, as the supervisor saw it."""

    recorded: int  # cells it recorded
    in_flight: bool  # its in-flight note names the first cell still pending
    timed_out: bool  # it was stopped: its cell ran past cell_timeout_s, or it had not started it in time
    returncode: int | None


def blame(end: WorkerEnd, timeout_s: float, output: str) -> tuple[str, str] | None:
    """The status and message the first pending cell is recorded with after a worker ended with
    cells still pending; None where a fresh worker simply goes on.

    A worker may stop between cells (after a CUDA fault it recorded, its context is useless; after a
    cell that failed across processes, its group may hold unmatched transfers):
    it is to blame only if it died in a cell, or before finishing any, so that a worker that
    cannot start never loops. ``output`` is the end of the worker's log.
    """
    if not end.in_flight and end.recorded > 0:
        return None
    if end.timed_out and end.in_flight:
        return records.TIMEOUT, (
            f"the cell ran past cell_timeout_s ({timeout_s:g} s) and its worker was stopped; its output ended: {output}"
        )
    if end.timed_out:
        limit = distributed.group_timeout(timeout_s).total_seconds()
        return records.TIMEOUT, (
            f"the worker had not started this cell {limit:g} s after its launch or its last record (the process "
            f"group's timeout, cell_timeout_s plus {distributed.GROUP_TIMEOUT_GRACE_S:g} s) and was stopped; its "
            f"output ended: {output}"
        )
    when = "during this cell" if end.in_flight else "before starting this cell"
    return records.CRASHED, f"the worker exited with code {end.returncode} {when}; its output ended: {output}"


def _first_interrupt(*_: object) -> None:
    """Ctrl-C: stop the sweep, keeping what is stored; a second Ctrl-C ends the process at once.
    Ending there loses nothing: records are fsynced line by line and run.json is replaced whole."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen) -> None:
    """Kill a worker and everything it started (the launcher's ranks)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@dataclass
class _WorldSize:
    """One world size's jobs on their way to records, as the supervisor follows its workers."""

    run_dir: Path
    world_size: int
    pending: list[jobs.Job]
    tail: records.RecordTail
    on_record: Callable[[Record], None]

    def current(self) -> Cell:
        """The cell the worker runs now, or is to run next: the first pending job's."""
        cell = self.pending[0].current()
        assert cell is not None, "a job leaves the pending list once it is done"
        return cell

    def take_new_records(self) -> int:
        """Pass on the records appended since the last look; how many were this world size's."""
        taken = 0
        for record in self.tail.new():
            job = next((job for job in self.pending if job.current() == record.cell), None)
            if job is None:
                continue
            job.note(record)
            jobs.note_elsewhere(self.pending, record, job)
            self.pending = [job for job in self.pending if job.current() is not None]
            self.on_record(record)
            taken += 1
        return taken

    def overdue(self, since: float, timeout_s: float) -> bool:
        """Whether the current cell has run past ``timeout_s``, by the worker's note. Before the worker
        notes it (while it starts, or between cells) the cell has not begun: the worker is overdue
        only past the process group's timeout since ``since``, which bounds every wait there."""
        note = folder.inflight(self.run_dir, self.world_size)
        if note.get("cell_id") == self.current().id:
            return time.time() - note["started"] > timeout_s
        return time.time() - since > distributed.group_timeout(timeout_s).total_seconds()

    def watch(self, command: list[str], log_path: Path, timeout_s: float) -> WorkerEnd:
        """Start a worker and follow it until it exits, every job is done, or a cell runs too long."""
        recorded, timed_out = 0, False
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env.worker_environment(),
                start_new_session=True,
                preexec_fn=worker.die_with_parent,
            )
            try:
                progress = time.time()
                while self.pending:
                    exited = process.poll() is not None  # read before the records, so none written at exit is missed
                    if taken := self.take_new_records():
                        recorded += taken
                        progress = time.time()
                    if exited or not self.pending:
                        break
                    if self.overdue(progress, timeout_s):
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
        note = folder.inflight(self.run_dir, self.world_size)
        in_flight = bool(self.pending) and note.get("cell_id") == self.current().id
        return WorkerEnd(recorded, in_flight, timed_out, process.returncode)


def _run_world_size(world: _WorldSize, timeout_s: float, threads: int) -> None:
    """Run one world size's jobs in workers, a fresh one after each that stops, until all are done.
    A search goes on in the fresh worker from its recorded probes, the blamed one included."""
    log_path = world.run_dir / f"worker-{world.world_size}.log"
    while world.pending:
        pending_file = folder.write_pending(world.run_dir, world.world_size, world.pending)
        launched_at = _mark_launch(log_path, world)
        end = world.watch(worker.command(world.world_size, world.run_dir, pending_file, threads), log_path, timeout_s)
        verdict = blame(end, timeout_s, _output_since(log_path, launched_at)) if world.pending else None
        if verdict:
            status, message = verdict
            with records.RecordWriter(world.run_dir) as writer:
                writer.append(
                    make_record(world.current(), {"status": status, "error": Failure(status.capitalize(), message)})
                )
            world.take_new_records()  # the file is the one source of records, the supervisor's own included
    folder.clear_notes(world.run_dir, world.world_size)  # every cell has its record: nothing is pending


def _mark_launch(log_path: Path, world: _WorldSize) -> int:
    """Append a line that starts this launch's part of the worker log; return where its output begins.
    One log keeps every launch of a world size, resumed runs' included, each under its own line."""
    cell = world.current()
    line = (
        f"=== {env.snapshot_time()}: a worker of {world.world_size} process(es) starts, "
        f"{len(world.pending)} job(s) pending, from {cell.label or cell.implementation} at seq_len {cell.seq_len} ===\n"
    )
    with log_path.open("ab") as log:
        log.write(line.encode())
        return log.tell()


def _output_since(log_path: Path, offset: int) -> str:
    """The end of what the worker log holds from ``offset`` on: one launch's output, not an earlier one's."""
    with log_path.open("rb") as log:
        log.seek(max(offset, log_path.stat().st_size - LOG_TAIL_CHARS * 4))  # UTF-8: at most 4 bytes a character
        return log.read().decode(errors="replace")[-LOG_TAIL_CHARS:]


def _changes(stored: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between a run's stored config and the sweep's now, key by key and implementation
    by implementation (by its name with every option, or whole where only its label differs)."""

    def entries(config: dict[str, Any]) -> dict[str, Any]:
        return {
            **{key: value for key, value in config.items() if key != "implementations"},
            **{f"implementations[{index}]": entry for index, entry in enumerate(config.get("implementations", []))},
        }

    def text(where: str, value: Any) -> str:
        if where.startswith("implementations[") and value:
            return implementation_label(value["name"], dict(value["options"]))
        return json.dumps(value)

    before, after = entries(stored), entries(now)
    changes = []
    for where in dict.fromkeys([*before, *after]):
        old, new = before.get(where), after.get(where)
        if old == new:
            continue
        texts = text(where, old), text(where, new)
        if texts[0] == texts[1]:  # an implementation whose label alone differs
            texts = json.dumps(old), json.dumps(new)
        changes.append(f"{where} {texts[0]} → {texts[1]}")
    return ", ".join(changes)


def _resume(run_dir: Path, sweep: Sweep, plan: Plan, source: str, retry_failed: bool, threads: int) -> None:
    """Check that the run folder belongs to this sweep, mend a cut-off record, note the resumption."""
    meta = records.read_run(run_dir)
    started = meta.get("environment", {}).get("ringbench") or {}
    by = f"ringbench {started.get('version', '?')}" + (
        f" at commit {started['commit'][:8]}" if started.get("commit") else ""
    )
    if meta["config_hash"] != sweep.hash:
        # A newer ringbench can change it too: an option an implementation gained is set to its default.
        raise ConfigError(
            source,
            "",
            f"does not describe the sweep in {run_dir} any more ({_changes(meta['config'], sweep.as_dict())}): "
            f"the config, or the options this ringbench gives its implementations, changed since {by} started it",
        )
    stored = ([p["cell_id"] for p in meta["planned"]], [s["search_id"] for s in meta.get("searches", [])])
    if stored != ([c.id for c in plan.cells], [s.id for s in plan.searches]):
        raise ConfigError(
            source, "", f"this ringbench plans other cells from it than {by} did for the run in {run_dir}"
        )
    repaired = records.drop_partial_line(run_dir)
    meta.setdefault("resumed", []).append(
        {
            "date_utc": env.snapshot_time(),
            "retry_failed": retry_failed,
            "dropped_partial_record": repaired,
            "threads": threads,
        }
    )
    records.write_json_atomic(run_dir / records.RUN_FILE, meta)


def run(
    sweep: Sweep,
    plan: Plan,
    source: str,
    device: torch.device,
    observer: Observer,
    output_root: Path,
    resume: Path | None = None,
    retry_failed: bool = False,
    threads: int | None = None,
    predictions: dict[str, Any] | None = None,
) -> RunResult:
    """Run the plan in a new run folder, or, with ``resume``, the jobs a stopped run has not finished.

    ``threads``, the workers' intra-op thread count, overrides the config's (default: physical cores).
    ``predictions`` (``ringbench predict``'s) are kept in the new folder.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = threads or sweep.threads or env.default_threads()
    if resume:
        _resume(resume, sweep, plan, source, retry_failed, threads)
    run_dir = resume or folder.start(sweep, plan, source, device, output_root, threads, predictions)
    result = RunResult(run_dir, records=list(records.read_records(run_dir)))
    # One world size after another, each in the plan's order.
    pending = sorted(jobs.planned(plan, records.done(run_dir, retry_failed)), key=lambda job: job.world_size)
    # A search's number of probes is known only once it ends.
    observer.started(run_dir, None if plan.searches else len(pending))
    finished = 0

    def upcoming() -> Cell | None:
        return next((cell for job in pending if (cell := job.current()) is not None), None)

    def on_record(record: Record) -> None:
        nonlocal finished
        result.records.append(record)
        observer.cell_finished(finished, record.cell, record)
        finished += 1
        if (cell := upcoming()) is not None:
            observer.cell_started(finished, cell)

    previous = signal.signal(signal.SIGINT, _first_interrupt)
    try:
        if (cell := upcoming()) is not None:
            observer.cell_started(0, cell)
        for world_size in sorted({job.world_size for job in pending}):
            world_jobs = [job for job in pending if job.world_size == world_size]
            _run_world_size(
                _WorldSize(run_dir, world_size, world_jobs, records.RecordTail(run_dir), on_record),
                sweep.cell_timeout_s,
                threads,
            )
    except KeyboardInterrupt:
        result.interrupted = True
        folder.clear_notes(run_dir)  # the stopped cells have no record: nothing is pending or in flight
    finally:
        signal.signal(signal.SIGINT, previous)
    folder.finish(run_dir)
    # The file is the truth: an interrupt can fall between writing a record and noting it.
    result.records = list(records.read_records(run_dir))
    return result
