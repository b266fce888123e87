"""A folder of runs at a glance: the index (a row per run, linking the run's own report), and
which runs' reports are out of date."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pandas as pd

from ringbench import records
from ringbench.report.load import Run
from ringbench.report.markdown import escape, table
from ringbench.report.render import devices, render_report, stamp_commit, stamp_date
from ringbench.report.summary import headline

REPORT = "report.md"
INDEX = "index.md"
# The code a report depends on: the report package, and the modules that read, upgrade and name
# what it shows. A report older than any of them is rendered again.
_PACKAGE = Path(__file__).parent.parent
_RENDERER = (
    *(_PACKAGE / "report").glob("*.py"),
    *(_PACKAGE / name for name in ("records.py", "schema.py", "vocabulary.py")),
)


def current(run_dir: Path) -> bool:
    """Whether the run's report is newer than its records, its run.json and the code that renders it."""
    report = run_dir / REPORT
    if not report.is_file():
        return False
    sources = [run_dir / records.RUN_FILE, run_dir / records.RECORDS_FILE, *_RENDERER]
    return report.stat().st_mtime >= max(path.stat().st_mtime for path in sources if path.exists())


def _cells(run: Run) -> str:
    ok = int((run.frame["status"] == records.OK).sum())
    failed = len(run.frame) - ok
    planned = len(run.meta["planned"])
    unfinished = f", {planned - len(run.frame)} not run" if len(run.frame) < planned else ""
    return f"{ok} ok, {failed} failed{unfinished}"


def _entries(runs: list[Run]) -> list[dict[str, str]]:
    """A row per run, newest first: its folder's name, date, commit, hardware, config, cells and headline."""
    return [
        {
            "run": run.path.name,
            "date": stamp_date(run.meta["environment"]),
            "commit": stamp_commit(run.meta["environment"]["git"]),
            "hardware": devices(run.meta),
            "config": run.meta["config"]["name"],
            "cells": _cells(run),
            "headline": headline(run.frame),
        }
        for run in reversed(runs)
    ]


def render_index(runs: list[Run], root: Path) -> str:
    """The runs under ``root``, newest first, each linking its report.md."""
    rows = pd.DataFrame(_entries(runs))
    rows["run"] = [
        f"[{escape(run.path.name)}]({Path(os.path.relpath(run.path, root)).as_posix()}/{REPORT})"
        for run in reversed(runs)
    ]
    rows["hardware"], rows["config"] = rows["hardware"].map(escape), rows["config"].map(escape)
    return f"# ringbench runs in `{escape(root)}`\n\n{table(rows)}\n"


def terminal_index(runs: list[Run], root: Path, width: int) -> str:
    """The index for a terminal ``width`` columns wide: the folder of runs, never broken (wider than the
    terminal, it overflows); then per run, newest first, a line of its folder (which begins with the
    date), config, hardware, cells and commit, and its headline indented further below."""
    lines = [f"ringbench runs in {root}, newest first:"]
    if len(lines[0]) > width:  # the folder on a line of its own, whole, so that it can be copied
        lines = ["ringbench runs, newest first, in", str(root)]
    for entry in _entries(runs):
        facts = [entry[key] for key in ("run", "config", "hardware", "cells")]
        lines += _fold([*facts, f"commit {entry['commit']}"], width, "  ", "    ")
        lines += textwrap.wrap(entry["headline"], width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


def _fold(items: list[str], width: int, first: str, rest: str) -> list[str]:
    """``items`` joined by " · " into lines of ``width``, broken between items (a continuation indented
    by ``rest``, the first line by ``first``), and within an item only where it alone is too wide."""
    lines = [first + items[0]]
    for item in items[1:]:
        if len(lines[-1]) + 3 + len(item) <= width:
            lines[-1] += " · " + item
        else:
            lines.append(rest + item)
    return [part for line in lines for part in textwrap.wrap(line, width, subsequent_indent=rest)]


def refresh(runs: list[Run], folders: list[Path], baseline: str | None, plots: bool) -> list[Path]:
    """Each run's report in its own folder, where missing or out of date (or always, when a baseline
    is named or figures are left out), and an index in each folder of runs. Returns the files written."""
    written = []
    for run in runs:
        if baseline is not None or not plots or not current(run.path):
            target = run.path / REPORT
            records.write_text_atomic(
                target, render_report([run], plots_dir=run.path if plots else None, baseline=baseline)
            )
            written.append(target)
    for folder in folders:
        records.write_text_atomic(folder / INDEX, render_index(within(runs, folder), folder))
        written.append(folder / INDEX)
    return written


def within(runs: list[Run], folder: Path) -> list[Run]:
    """The runs whose folders lie directly in ``folder``."""
    return [run for run in runs if run.path.parent == folder]
