"""Finding run folders and loading them into a flat pandas frame, one row per record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ringbench import records
from ringbench.errors import UserError, show
from ringbench.vocabulary import label_of

COLUMNS = [
    "cell_id", "implementation", "label", "seq_len", "ring_size", "world_size", "batch_size", "heads", "head_dim",
    "dtype", "causal", "pass", "status", "median_ms", "iqr_ms", "plain_ms", "rel_iqr", "noise_target", "n", "peak_mib", "modelled_mib", "held_mib",
    "total_mib",
    "tokens_per_s",
    "tflops", "tflops_per_device", "peak_tflops", "kernel", "projected_ms", "projected_iqr_ms", "projected_mib",
    "projected_total_mib", "rel_error", "max_abs_error", "tolerance",
    "rows_checked", "checked", "grad_rel_error", "gradients_checked", "check_s", "comm_step_mib", "comm_wait_share", "facts", "error_type", "error_message",
]


@dataclass
class Run:
    path: Path
    meta: dict[str, Any]
    frame: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


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


def _in_all(memory: dict[str, Any]) -> float | None:
    """What a call needs on its device in all: what it starts with (inputs or a rank's shards, and
    whatever setup keeps) plus its peak above that; None where either was not measured."""
    if memory.get("held_mib") is None or memory.get("peak_allocated_mib") is None:
        return None
    return memory["held_mib"] + memory["peak_allocated_mib"]


def _row(record: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    stats = record.get("stats") or {}
    memory = record.get("memory") or {}
    error = record.get("error") or {}
    check = record.get("check") or {}
    projected = record.get("projected") or {}
    projected_stats = projected.get("stats") or {}
    facts = record.get("facts") or {}
    comm = record.get("comm") or {}
    return {
        "cell_id": record["cell_id"],
        "implementation": record["implementation"],
        "label": label_of(record),
        "seq_len": record["seq_len"],
        "ring_size": record.get("ring_size"),
        "world_size": record.get("world_size", 1),
        "batch_size": record["batch_size"],
        "heads": record["heads"],
        "head_dim": record["head_dim"],
        "dtype": record["dtype"],
        "causal": record["causal"],
        "pass": record["pass"],
        "status": record["status"],
        "median_ms": stats.get("median_ms"),
        "iqr_ms": stats.get("iqr_ms"),
        # Plain calls' time where the headline is graph replays' (records from before lack it).
        "plain_ms": ((record.get("plain") or {}).get("stats") or {}).get("median_ms"),
        "rel_iqr": None if not stats.get("median_ms") else stats["iqr_ms"] / stats["median_ms"],
        "noise_target": (record.get("noise") or {}).get("target"),
        "n": stats.get("n"),
        "peak_mib": memory.get("peak_allocated_mib"),
        "modelled_mib": memory.get("modelled_mib"),
        "held_mib": memory.get("held_mib"),
        "total_mib": _in_all(memory),
        "tokens_per_s": record.get("tokens_per_s"),
        "tflops": record.get("tflops"),
        "tflops_per_device": None if record.get("tflops") is None else record["tflops"] / record.get("world_size", 1),
        "peak_tflops": peaks.get(record["dtype"]),
        "kernel": facts.get("kernel", facts.get("backend")),
        "projected_ms": projected_stats.get("median_ms"),
        "projected_iqr_ms": projected_stats.get("iqr_ms"),
        "projected_mib": projected.get("peak_allocated_mib"),
        "projected_total_mib": _in_all(projected),
        "rel_error": check.get("rel_error"),
        "max_abs_error": check.get("max_abs_error"),
        "tolerance": check.get("tolerance"),
        "rows_checked": check.get("rows_checked"),
        "checked": bool(check),
        "grad_rel_error": (check.get("gradients") or {}).get("rel_error"),
        "gradients_checked": None if record["pass"] == "forward" else bool((check.get("gradients") or {}).get("checked")),
        "check_s": check.get("seconds"),
        "comm_step_mib": None if comm.get("sent_bytes_per_step") is None else comm["sent_bytes_per_step"] / 2**20,
        "comm_wait_share": comm.get("wait_share"),
        "facts": ", ".join(f"{key} {value}" for key, value in sorted(facts.items())) or None,
        "error_type": error.get("type"),
        "error_message": error.get("message"),
    }


MAX_WARNINGS = 5  # per records file


class UnreadableRun(ValueError):
    """A folder that looks like a run (it has a run.json) but whose run.json cannot be used."""


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return records.read_run(path)
    except records.BrokenRun as exc:
        raise UnreadableRun(f"{exc.where}: run skipped, {exc.reason}") from None

def load_run(path: Path) -> Run:
    """One run folder's records as a frame; bad record lines become warnings. Raises
    UnreadableRun when the folder's run.json is not a ringbench run file."""
    meta = _read_meta(path)
    rows, warnings = [], []
    records_path = path / records.RECORDS_FILE
    lines = records_path.read_text(encoding="utf-8", errors="replace").splitlines() if records_path.exists() else []
    planned = {cell["cell_id"] for cell in meta["planned"]}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record.get("schema_version") != records.SCHEMA_VERSION:
                raise ValueError(f"schema version {record.get('schema_version')!r}, expected {records.SCHEMA_VERSION}")
            rows.append(_row(record, meta["environment"].get("matmul_peak_tflops") or {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.append(f"{records_path}:{number}: record skipped ({type(exc).__name__}: {show(str(exc))[1:-1]})")
            continue
        if record["cell_id"] not in planned:  # shown all the same: the reader decides what it is worth
            warnings.append(f"{records_path}:{number}: cell {str(record['cell_id'])[:40]} ({str(record['implementation'])[:60]}) "
                            "is not in this run's plan")
    if len(warnings) > MAX_WARNINGS:  # a foreign or garbled file: say so, not once per line
        warnings[MAX_WARNINGS:] = [f"{records_path}: {len(warnings) - MAX_WARNINGS} more lines like these"]
    # A resumed run with --retry-failed holds several records of a cell: the latest counts.
    frame = pd.DataFrame(rows, columns=COLUMNS).drop_duplicates("cell_id", keep="last")
    # The roles the run's implementations declared (vocabulary.ROLES), on each of their cells.
    frame = frame.assign(**{role: frame["implementation"].isin(names) for role, names in meta["roles"].items()})
    return Run(path=path, meta=meta, frame=frame, warnings=warnings)
