"""What the terminal shows during and after a run: a Rich progress bar and a closing table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from ringbench import records
from ringbench.schema import Record
from ringbench.vocabulary import Cell

_STYLE = {records.OK: "green", records.OOM: "yellow", records.ERROR: "red"}


def _status(record: Record) -> str:
    status = record.status
    return f"[{_STYLE.get(status, 'magenta')}]{status}[/]"


class ProgressBar:
    """A runner observer drawing cell i of N, the current cell, elapsed time, ETA and the last status."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            # The cell wraps rather than squeezing the counts off a narrow terminal.
            TextColumn("{task.description}", table_column=Column(ratio=1, overflow="fold")),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[last]}"),
            console=console,
            expand=True,
        )
        self.task: TaskID | None = None  # from ``started``, which the runner calls before any cell

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def started(self, run_dir: Path, total: int | None) -> None:
        self.console.print(f"run folder: {run_dir}")
        self.task = self.progress.add_task("starting", total=total, last="")

    def cell_started(self, index: int, cell: Cell) -> None:
        assert self.task is not None, "started before any cell"
        self.progress.update(self.task, description=cell.title)

    def cell_finished(self, index: int, cell: Cell, record: Record) -> None:
        assert self.task is not None, "started before any cell"
        self.progress.update(self.task, advance=1, last=f"last: {_status(record)}")


# The shape axes as the closing table shows them: a column where they vary, else in the title.
_AXES = {
    "dtype": lambda record: record.dtype,
    "causal": lambda record: "causal" if record.causal else "non-causal",
    "pass": lambda record: record.pass_name,
    "B": lambda record: f"B={record.batch_size}",
    "H": lambda record: f"H={record.heads}",
    "D": lambda record: f"D={record.head_dim}",
}


def summary_table(cell_records: list[Record]) -> Table:
    """Every finished cell in a table that reads at 80 columns: labels wrap rather than being cut,
    axes with one value across the run go to the title, and memory goes where none was measured (the CPU)."""
    varying = [name for name, read in _AXES.items() if len({read(record) for record in cell_records}) > 1]
    constant = [read(cell_records[0]) for name, read in _AXES.items() if name not in varying] if cell_records else []
    table = Table(title=" · ".join(["ringbench run", *constant]))
    peaks = [record.memory.peak_allocated_mib if record.memory else None for record in cell_records]
    measured = any(peak is not None for peak in peaks)
    table.add_column("implementation", overflow="fold", ratio=1, min_width=len("implementation"))
    table.add_column("seq_len", justify="right")
    table.add_column("run as")
    for name in varying:
        table.add_column(name, overflow="fold")
    table.add_column("status")
    table.add_column("median ms", justify="right")
    if measured:
        table.add_column("peak MiB", justify="right")
    for record, peak in zip(cell_records, peaks):
        table.add_row(
            record.display_label,
            str(record.seq_len),
            str(record.cell.placement),
            *(_AXES[name](record) for name in varying),
            _status(record),
            f"{record.median_ms:.4g}" if record.median_ms is not None else "-",
            *([f"{peak:,.1f}" if peak is not None else "-"] if measured else []),
        )
    return table
