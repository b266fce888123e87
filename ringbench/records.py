"""Stored results: a run folder holding ``run.json`` (environment, config, plan) and
``records.jsonl`` (one line per finished cell, appended and fsynced as it ends).

Every stored object carries ``schema_version``; a record is read and written as a
``ringbench.schema.Record``. This module never imports torch: the report reads through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ringbench.errors import UserError, show

# The statuses are the record's (the schema checks them); callers name them from here, beside the files.
from ringbench.schema import (  # noqa: F401  (re-exported)
    CRASHED,
    ERROR,
    FAILED,
    MEASURED,
    OK,
    OOM,
    SCHEMA_VERSION,
    SKIPPED,
    TIMEOUT,
    WRONG,
    Record,
)

RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1
PREDICTIONS_FILE = "predictions.json"
PREDICTIONS_VERSION = 1


def create_run_dir(output_root: Path, commit: str) -> Path:
    """A new folder ``<UTC time>-<commit>`` under the output root; never reuses an existing one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output_root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        path = output_root / f"{stamp}-{commit[:8]}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder under {output_root}")


def writable(path: Path) -> Path:
    """``path`` as a file to write: its missing parent folders made; a folder there is refused."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder; name a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot create its folder ({exc.strerror or exc})") from None
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see half a file, and no
    temporary file stays behind whatever fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


class RecordWriter:
    """Appends one JSON line per record and forces it to disk before returning."""

    def __init__(self, run_dir: Path):
        self._handle = (run_dir / RECORDS_FILE).open("a", encoding="utf-8")

    def append(self, record: Record) -> None:
        self._handle.write(json.dumps(record.to_json(), sort_keys=True, allow_nan=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


RUN_KEYS = ("config", "config_hash", "config_source", "environment", "planned", "excluded")


def config_file(meta: dict[str, Any]) -> Path:
    """The config a run was started from: absolute, or as given for runs stored before that."""
    return Path(meta.get("config_file") or meta["config_source"])


class BrokenRun(UserError):
    """A run folder whose run.json or records.jsonl cannot be used, said in one line naming the file."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


# Runs stored before implementations declared roles had these two, fixed in the report's code.
ROLES_BEFORE_DECLARED = {"baseline": ["standard"], "peer": ["sdpa"]}


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run's run.json, checked to be one ringbench wrote, with what older runs lack filled in."""
    path = run_dir / RUN_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8, not JSON
        raise BrokenRun(str(path), f"cannot read it ({type(exc).__name__}: {show(str(exc))[1:-1]})") from None
    missing = [key for key in RUN_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise BrokenRun(str(path), f"not a ringbench run file (missing {', '.join(missing)})")
    meta.setdefault("roles", ROLES_BEFORE_DECLARED)
    environment = meta["environment"]
    if "library_settings" not in environment:  # runs from before kept the allocator's setting alone
        conf = environment.get("pytorch_cuda_alloc_conf")
        environment["library_settings"] = {"PYTORCH_CUDA_ALLOC_CONF": conf} if conf else {}
    return meta


def _parse(line: str, where: str) -> Record:
    try:
        return Record.from_json(json.loads(line))
    except ValueError as exc:
        raise BrokenRun(
            where, f"not a record ({show(str(exc))[1:-1]}); a run cut off while writing is mended by resuming it"
        ) from None


def read_records(run_dir: Path) -> Iterator[Record]:
    """The run's records; a line that is not a record stops the reading with a BrokenRun."""
    path = run_dir / RECORDS_FILE
    if not path.exists():
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield _parse(line, f"{path}:{number}")


class RecordTail:
    """The records appended to a run's records.jsonl since the last look, read from where the last
    look stopped: the supervisor follows its workers at a cost that does not grow with the run.
    A line still being written (no newline yet) waits for the next look."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / RECORDS_FILE
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new(self) -> list[Record]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        lines = complete.decode("utf-8", errors="replace").splitlines()
        found = [_parse(line, f"{self.path}@{self.offset}") for line in lines if line.strip()]
        self.offset += len(complete)
        return found


def drop_partial_line(run_dir: Path) -> bool:
    """Cut a last line left unfinished by a killed writer; True if there was one."""
    path = run_dir / RECORDS_FILE
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with path.open("r+b") as handle:
        handle.truncate(data.rfind(b"\n") + 1)
        os.fsync(handle.fileno())
    return True


def done(run_dir: Path, retry_failed: bool) -> list[Record]:
    """The records of the cells a resumed run need not run again: the latest record of each cell
    decides, and with ``retry_failed`` a failed one does not count."""
    latest = {record.cell_id: record for record in read_records(run_dir)}
    return [record for record in latest.values() if not (retry_failed and record.status in FAILED)]


def read_calibration(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The machine's measurements per world size (``run.calibrate``) a run stored; none if it stored none."""
    path = run_dir / CALIBRATION_FILE
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["schema_version"] != CALIBRATION_VERSION:
            raise ValueError(f"schema_version {stored['schema_version']}, this version reads {CALIBRATION_VERSION}")
        return {int(world_size): entry for world_size, entry in stored["world_sizes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BrokenRun(str(path), f"cannot read it ({type(exc).__name__}: {show(str(exc))[1:-1]})") from None


def write_calibration(run_dir: Path, entry: dict[str, Any]) -> None:
    """Store one world size's measurements beside those of others already there."""
    stored = read_calibration(run_dir) | {entry["world_size"]: entry}
    by_size = {str(size): stored[size] for size in sorted(stored)}
    write_json_atomic(run_dir / CALIBRATION_FILE, {"schema_version": CALIBRATION_VERSION, "world_sizes": by_size})


def _predictions_problem(stored: Any) -> str | None:
    """What makes ``stored`` no predictions file of this version, by field; None if nothing does."""
    if not isinstance(stored, dict) or stored.get("schema_version") != PREDICTIONS_VERSION:
        found = stored.get("schema_version") if isinstance(stored, dict) else None
        return f"schema_version: expected {PREDICTIONS_VERSION}, got {found!r} (write it with ringbench predict)"
    try:
        made_at = datetime.fromisoformat(stored["made_at"])
    except (KeyError, TypeError, ValueError):
        made_at = None
    if made_at is None or made_at.tzinfo is None:  # compared with the run's start, which has its offset
        return f"made_at: expected an ISO date and time with its UTC offset, got {stored.get('made_at')!r}"
    sources = stored.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(source, str) for source in sources):
        return "sources: expected the names of the runs predicted from"
    cells = stored.get("cells")
    if not isinstance(cells, dict):
        return "cells: expected an object of predictions by cell id"
    for cell_id, predicted in cells.items():
        for name in ("ms", "efficiency"):
            value = predicted.get(name) if isinstance(predicted, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                return f"cells.{cell_id}.{name}: expected a positive number, got {value!r}"
    return None


def read_predictions(path: Path) -> dict[str, Any]:
    """A predictions file (``report.predictions``), checked field by field; BrokenRun names the
    field that is wrong."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BrokenRun(str(path), f"cannot read it ({type(exc).__name__}: {show(str(exc))[1:-1]})") from None
    problem = _predictions_problem(stored)
    if problem:
        raise BrokenRun(str(path), problem)
    return stored


def is_run_dir(path: Path) -> bool:
    return (path / RUN_FILE).is_file()
