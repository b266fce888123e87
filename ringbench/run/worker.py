"""A worker: the process, or across processes each rank of a group, that runs one world size's
jobs in the order given — cells, and searches probe by probe (``run.jobs``) — marking each cell in
flight; rank 0 alone appends the records.

The supervisor starts one as ``python -m ringbench.run.worker RUN_DIR PENDING_FILE``; a user's
own launcher (torchrun) starts the ranks through ``ringbench run``, and then rank 0 creates the
run folder itself.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from ringbench import records
from ringbench.errors import UserError
from ringbench.run import calibrate, distributed, env, folder, jobs
from ringbench.run.distributed import OneProcess
from ringbench.run.memory import Cap
from ringbench.run.modes import prime_libraries
from ringbench.run.pipeline import TORCH_DTYPES, Abandoned, make_record, run_cell
from ringbench.schema import Failure, Record
from ringbench.sweep import plan as plans
from ringbench.sweep.config import Sweep
from ringbench.sweep.plan import Plan
from ringbench.vocabulary import Cell

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies, SIGKILL included (Linux only),
    so no worker outlives a stopped supervisor and appends records behind a resumed run."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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
    Cap.of(sweep.memory_cap_gib, device).apply(device)  # before anything is allocated, for the whole run
    prime_libraries(device, [TORCH_DTYPES[dtype] for dtype in sweep.dtypes])


def _why_stop(record: Record, group: OneProcess) -> str | None:
    """Why this worker must leave the cells after ``record``'s to a fresh one, if it must."""
    if group.world_size == 1 and not _usable(group.device):
        return "the CUDA context is broken (a sticky error)"
    if group.world_size > 1 and record.status in (records.OOM, records.ERROR):
        # Its ranks may have failed at different points, one leaving a transfer or collective posted
        # that the others never joined: on the same group it would meet the next cell's.
        return "the cell failed across processes"
    return None


def _measure(cell: Cell, sweep: Sweep, plan: Plan, group: OneProcess) -> Record:
    """The cell's record. A search's probe the implementation cannot run (its plan checked only the
    first probe and one granule) is recorded as skipped with the reason, which ends the search
    there, saying why, rather than silently."""
    implementation = plan.implementations[cell.implementation]
    reason = plans.exclusion_reason(cell, implementation)
    if reason:
        return make_record(cell, {"status": records.SKIPPED, "error": Failure("Skipped", reason)}, group.device)
    capacity = Cap.of(sweep.memory_cap_gib, group.device).capacity_bytes
    return run_cell(cell, implementation, group, sweep.timing, sweep.seed, sweep.skip_oversized_inputs, capacity)


def _calibrate(group: OneProcess, run_dir: Path) -> None:
    """Measure the links of a group of several processes once per run and world size (a resumed or
    fresh worker finds them stored), for the report's scaling model."""
    if group.world_size == 1:
        return
    stored = group.broadcast(group.world_size in records.read_calibration(run_dir) if group.is_leader else None)
    if not stored:
        measured = calibrate.measure(group)
        if group.is_leader:
            records.write_calibration(run_dir, measured)


def serve(
    sweep: Sweep,
    plan: Plan,
    pending: list[jobs.Job] | None,
    run_dir: Path | None,
    source: str,
    output_root: Path,
    threads: int | None = None,
    predictions: dict[str, Any] | None = None,
) -> Path:
    """Run the ``pending`` jobs (None: every planned one of this world size) on this process's group,
    rank 0 marking each cell in flight and appending its record.

    Started by the supervisor, ``run_dir`` is its run folder. Under a user's own launcher
    ``run_dir`` is None: rank 0 creates the run folder (keeping ``predictions`` there) and stamps it
    at the end. ``threads`` is the intra-op thread count of the host, shared by the ranks on it.
    """
    die_with_parent()
    print(f"ringbench worker {os.getpid()} started", flush=True)  # one line per start in the worker's log
    threads = threads or sweep.threads or env.default_threads()
    group = distributed.join(env.resolve_device(sweep.device, source), distributed.group_timeout(sweep.cell_timeout_s))
    try:
        _prepare(group.device, sweep, threads, distributed.local_world_size())
        created = group.is_leader and run_dir is None
        if created:
            run_dir = folder.start(sweep, plan, source, group.device, output_root, threads, predictions)
        run_dir = Path(group.broadcast(str(run_dir) if group.is_leader else None))
        _calibrate(group, run_dir)
        if pending is None:
            pending = [job for job in jobs.planned(plan, ()) if job.world_size == group.world_size]
        # Everything alive now (libraries, the group) lives as long as the worker: collected once and
        # frozen, it is not walked again by the full collection that ends every cell (pipeline's
        # _release), and no garbage of the calibration is frozen with it.
        gc.collect()
        gc.freeze()
        with records.RecordWriter(run_dir) if group.is_leader else contextlib.nullcontext() as writer:
            for job in pending:
                # A search's next probe follows from the agreed record of its last, alike on every rank.
                while (cell := job.current()) is not None:
                    if writer:
                        folder.mark_inflight(run_dir, cell)
                    try:
                        record = _measure(cell, sweep, plan, group)
                    except Abandoned as abandoned:
                        _abandon(run_dir, writer, abandoned)
                    if writer:
                        writer.append(record)
                    job.note(record)
                    jobs.note_elsewhere(pending, record, job)
                    why = None if created else _why_stop(record, group)  # a user's launcher starts no fresh one
                    if why:
                        print(f"{why}; a fresh worker takes the next cells", flush=True)
                        os._exit(0)  # its teardown could hang on a broken context or group; the record is on disk
        if created:
            folder.clear_notes(run_dir)
            folder.finish(run_dir)
        return run_dir
    finally:
        group.leave()


def _abandon(run_dir: Path, writer: records.RecordWriter | None, abandoned: Abandoned) -> NoReturn:
    """End this worker after a cell that failed on some ranks and left others stuck: one rank of those
    that got past it records the cell (rank 0 may be a stuck one), and every one exits with an error,
    on which the launcher ends the stuck ranks. A fresh worker takes the next cells."""
    if abandoned.recorder:
        assert abandoned.record is not None, "run_cell attaches the record"
        (writer or records.RecordWriter(run_dir)).append(abandoned.record)
    print(f"{abandoned}; this worker ends, and a fresh one takes the next cells", flush=True)
    os._exit(1)


def command(world_size: int, run_dir: Path, pending: Path, threads: int) -> list[str]:
    """How the supervisor starts a worker of ``world_size``: one process, or that many through PyTorch's launcher."""
    worker = ["-m", "ringbench.run.worker", str(run_dir), str(pending), "--threads", str(threads)]
    if world_size == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}", *worker]


def _load(run_dir: Path) -> tuple[Sweep, Plan, str]:
    """The sweep and plan of the run in ``run_dir``, from the config it names, unchanged since it started."""
    meta = records.read_run(run_dir)
    source = str(records.config_file(meta))
    sweep, plan = plans.load(source)
    if sweep.hash != meta["config_hash"]:  # edited while the run goes on: its cells are no longer this run's
        raise UserError(
            f"{source}: changed since the run in {run_dir} started (config hash {sweep.hash}, "
            f"run {meta['config_hash']}); restore it, or start a new run"
        )
    return sweep, plan, source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ringbench.run.worker", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run folder; its run.json names the config")
    parser.add_argument("pending", type=Path, help="the jobs to run, as the supervisor wrote them")
    parser.add_argument("--threads", type=int, help="intra-op threads of the host, shared by its ranks")
    arguments = parser.parse_args(argv)
    try:
        sweep, plan, source = _load(arguments.run_dir)
        pending = folder.read_pending(arguments.pending, plan)
    except UserError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    serve(sweep, plan, pending, arguments.run_dir, source, Path(sweep.output_root), arguments.threads)


if __name__ == "__main__":
    main()
