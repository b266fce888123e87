"""Finding run folders and loading them into a flat pandas frame, one row per record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from ringbench import records
from ringbench.attention.models import PASS_FACTOR, dense_flops
from ringbench.errors import UserError, show
from ringbench.report.tables import SHAPE
from ringbench.schema import GpuState, Memory, Projected, Record

COLUMNS = [
    "cell_id",
    "implementation",
    "options",
    "label",
    "seq_len",
    "ring_size",
    "world_size",
    "batch_size",
    "heads",
    "head_dim",
    "dtype",
    "causal",
    "pass",
    "status",
    "median_ms",
    "iqr_ms",
    "plain_ms",
    "launch_ms",
    "device_ms",
    "rel_iqr",
    "noise_target",
    "n",
    "peak_mib",
    "modelled_mib",
    "held_mib",
    "total_mib",
    "tokens_per_s",
    "tflops",
    "tflops_per_device",
    "peak_tflops",
    "dense_share",
    "kernel",
    "transfers",
    "sm_clock_mhz",
    "sm_clock_top_mhz",
    "clock_held_by",
    "projected_ms",
    "projected_iqr_ms",
    "projected_mib",
    "projected_total_mib",
    "rel_error",
    "max_abs_error",
    "tolerance",
    "rows_checked",
    "checked",
    "grad_rel_error",
    "gradients_checked",
    "check_s",
    "comm_call_mib",
    "comm_step_mib",
    "comm_wait_share",
    "facts",
    # A prediction made before the run (``report.predictions``), where the run kept one.
    "predicted_ms",
    "predicted_efficiency",
    "predicted_host_paced",
    "prediction",
    "error_type",
    "error_message",
]


@dataclass
class Run:
    path: Path
    meta: dict[str, Any]
    frame: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    calibration: dict[int, dict[str, Any]] = field(default_factory=dict)  # per world size: records.read_calibration


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path is a run folder or a folder of run folders; returns run folders, oldest first."""
    found = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such folder")
        runs = [path] if records.is_run_dir(path) else sorted(c for c in path.iterdir() if records.is_run_dir(c))
        if not runs:
            raise UserError(f"{path}: holds no ringbench run (no {records.RUN_FILE} found)")
        found.extend(runs)
    return found


def _in_all(memory: Memory | Projected | None) -> float | None:
    """What a call needs on its device in all: what it starts with (inputs or a rank's shards, and
    whatever setup keeps) plus its peak above that; None where either was not measured."""
    if memory is None or memory.held_mib is None or memory.peak_allocated_mib is None:
        return None
    return memory.held_mib + memory.peak_allocated_mib


def _dense_share(record: Record) -> float | None:
    """The share of dense attention's FLOPs the cell's implementation computes (below 1: sparse)."""
    if record.flops is None:
        return None
    return record.flops / (dense_flops(record.cell) * PASS_FACTOR[record.pass_name])


def _clocks(gpus: tuple[GpuState, ...] | None) -> dict[str, Any]:
    """The SM clock the cell's samples ran at: the slowest GPU's mean, which paces a cell across
    processes, against its top; and what held any of the GPUs below its top, in words."""
    if not gpus:
        return {"sm_clock_mhz": None, "sm_clock_top_mhz": None, "clock_held_by": None}
    slowest = min(gpus, key=lambda gpu: gpu.sm_clock_mhz)
    held_by = dict.fromkeys(reason for gpu in gpus for reason in gpu.held_by)
    return {
        "sm_clock_mhz": slowest.sm_clock_mhz,
        "sm_clock_top_mhz": slowest.sm_clock_top_mhz,
        "clock_held_by": ", ".join(held_by),
    }


def _row(record: Record, peaks: dict[str, float]) -> dict[str, Any]:
    stats, memory, check, projected, comm = record.stats, record.memory, record.check, record.projected, record.comm
    gradients = check.gradients if check else None
    facts = record.facts
    return {
        "cell_id": record.cell_id,
        "implementation": record.implementation,
        "options": json.dumps(record.options, sort_keys=True),
        "label": record.display_label,
        "seq_len": record.seq_len,
        "ring_size": record.ring_size,
        "world_size": record.world_size,
        "batch_size": record.batch_size,
        "heads": record.heads,
        "head_dim": record.head_dim,
        "dtype": record.dtype,
        "causal": record.causal,
        "pass": record.pass_name,
        "status": record.status,
        "median_ms": record.median_ms,
        "iqr_ms": stats.iqr_ms if stats else None,
        # Plain calls' time where the headline is graph replays'.
        "plain_ms": record.plain.stats.median_ms if record.plain else None,
        # One call's launch by the host, and its GPU work, each alone (the launch probe; every rank's largest).
        "launch_ms": record.modes.launch_ms if record.modes else None,
        "device_ms": record.modes.device_ms if record.modes else None,
        "rel_iqr": stats.iqr_ms / stats.median_ms if stats and stats.median_ms else None,
        "noise_target": record.noise.target if record.noise else None,
        "n": stats.n if stats else None,
        "peak_mib": memory.peak_allocated_mib if memory else None,
        "modelled_mib": memory.modelled_mib if memory else None,
        "held_mib": memory.held_mib if memory else None,
        "total_mib": _in_all(memory),
        "tokens_per_s": record.tokens_per_s,
        "tflops": record.tflops,
        "dense_share": _dense_share(record),
        "tflops_per_device": None if record.tflops is None else record.tflops / record.world_size,
        "peak_tflops": peaks.get(record.dtype),
        "kernel": facts.get("kernel"),
        # Which transfers a ring across processes ran where its options did not name NCCL's.
        "transfers": facts.get("transfers"),
        **_clocks(record.gpus),
        "projected_ms": projected.stats.median_ms if projected else None,
        "projected_iqr_ms": projected.stats.iqr_ms if projected else None,
        "projected_mib": projected.peak_allocated_mib if projected else None,
        "projected_total_mib": _in_all(projected),
        "rel_error": check.rel_error if check else None,
        "max_abs_error": check.max_abs_error if check else None,
        "tolerance": check.tolerance if check else None,
        "rows_checked": check.rows_checked if check else None,
        "checked": check is not None,
        "grad_rel_error": gradients.rel_error if gradients else None,
        "gradients_checked": None if record.pass_name == "forward" else bool(gradients and gradients.checked),
        "check_s": check.seconds if check else None,
        "comm_call_mib": comm.sent_bytes_per_call / 2**20 if comm and comm.sent_bytes_per_call is not None else None,
        # What records before schema 4 kept instead: the mean per ring step.
        "comm_step_mib": comm.sent_bytes_per_step / 2**20 if comm and comm.sent_bytes_per_step is not None else None,
        "comm_wait_share": comm.wait_share if comm else None,
        "facts": ", ".join(f"{key} {value}" for key, value in sorted(facts.items())) or None,
        "error_type": record.error.type if record.error else None,
        "error_message": record.error.message if record.error else None,
    }


# What a search's probes share: every parameter of a cell but its seq_len.
_SEARCH_AXES = ("implementation", "options", "ring_size", "world_size", *SHAPE)


def _search_key(params: dict[str, Any]) -> tuple[str, ...]:
    return tuple(json.dumps(params[axis], sort_keys=True) for axis in _SEARCH_AXES)


MAX_WARNINGS = 5  # per records file


class UnreadableRun(ValueError):
    """A folder that looks like a run (it has a run.json) but whose run.json cannot be used."""


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return records.read_run(path)
    except records.BrokenRun as exc:
        raise UnreadableRun(f"{exc.where}: run skipped, {exc.reason}") from None


def _lead(made_at: str, started: str) -> str:
    """How long before the run began a prediction was made, in words."""
    seconds = (datetime.fromisoformat(started) - datetime.fromisoformat(made_at)).total_seconds()
    if seconds < 0:
        return "after the run began"
    hours = seconds / 3600
    return f"{hours:.1f} h before the run began" if hours < 48 else f"{hours / 24:.0f} days before the run began"


def _with_predictions(frame: pd.DataFrame, path: Path, meta: dict[str, Any], warnings: list[str]) -> pd.DataFrame:
    """The frame with the predictions the run kept set on their cells; a file that cannot be read
    is a warning, and the cells stand without it."""
    if not (path / records.PREDICTIONS_FILE).exists():
        return frame
    try:
        stored = records.read_predictions(path / records.PREDICTIONS_FILE)
    except records.BrokenRun as exc:
        warnings.append(f"{exc.where}: {exc.reason}; the predictions are left out")
        return frame
    made = datetime.fromisoformat(stored["made_at"]).strftime("%Y-%m-%d %H:%M UTC")
    cells = stored["cells"]
    held = frame["cell_id"].isin(list(cells))
    lead = _lead(stored["made_at"], meta["environment"]["date_utc"])
    sources = ", ".join(stored["sources"])
    provenance = f"made {made} from {sources}, {lead}; {int(held.sum())} of its {len(cells)} cells in this run"
    return frame.assign(
        predicted_ms=frame["cell_id"].map(lambda cell_id: cells.get(cell_id, {}).get("ms")).astype(float),
        predicted_efficiency=frame["cell_id"]
        .map(lambda cell_id: cells.get(cell_id, {}).get("efficiency"))
        .astype(float),
        # Predictions made before they could be host-paced have no such field.
        predicted_host_paced=frame["cell_id"].map(lambda cell_id: bool(cells.get(cell_id, {}).get("host_paced"))),
        prediction=held.map({True: provenance, False: None}),
    )


def load_run(path: Path) -> Run:
    """One run folder's records as a frame; bad record lines become warnings. Raises
    UnreadableRun when the folder's run.json is not a ringbench run file."""
    meta = _read_meta(path)
    rows, warnings = [], []
    records_path = path / records.RECORDS_FILE
    lines = records_path.read_text(encoding="utf-8", errors="replace").splitlines() if records_path.exists() else []
    planned = {cell["cell_id"] for cell in meta["planned"]}
    searched = {_search_key(search) for search in meta.get("searches", [])}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = Record.from_json(json.loads(line))
        except ValueError as exc:  # JSON that does not parse, or is not a record this version reads
            warnings.append(f"{records_path}:{number}: record skipped ({type(exc).__name__}: {show(str(exc))[1:-1]})")
            continue
        rows.append(_row(record, meta["environment"].get("matmul_peak_tflops") or {}))
        probe = _search_key(record.cell.params()) in searched  # a search's probes are planned by the search
        if record.cell_id not in planned and not probe:  # shown all the same: the reader decides what it is worth
            warnings.append(
                f"{records_path}:{number}: cell {record.cell_id[:40]} ({record.implementation[:60]}) "
                "is not in this run's plan"
            )
    if len(warnings) > MAX_WARNINGS:  # a foreign or garbled file: say so, not once per line
        warnings[MAX_WARNINGS:] = [f"{records_path}: {len(warnings) - MAX_WARNINGS} more lines like these"]
    # A resumed run with --retry-failed holds several records of a cell: the latest counts.
    frame = pd.DataFrame(rows, columns=COLUMNS).drop_duplicates("cell_id", keep="last")
    # The roles the run's implementations declared (vocabulary.ROLES), on each of their cells.
    frame = frame.assign(**{role: frame["implementation"].isin(names) for role, names in meta["roles"].items()})
    frame = _with_predictions(frame, path, meta, warnings)
    try:
        calibration = records.read_calibration(path)
    except records.BrokenRun as exc:  # the cells stand without it; only the scaling model is lost
        calibration = {}
        warnings.append(f"{exc.where}: {exc.reason}; the scaling model is left out")
    return Run(path=path, meta=meta, frame=frame, warnings=warnings, calibration=calibration)
