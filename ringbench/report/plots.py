"""Figures of a run: time, memory and throughput against sequence length, and scaling
against the number of processes. Drawn with matplotlib's object API (no pyplot, no
display), so they render headless."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ringbench import records
from ringbench.report.tables import NO_RING, SHAPE, placement, shape_title



def _style(index: int) -> str:
    """Past the ten colours of the cycle, lines differ by dash pattern too."""
    return ("-", "--", ":", "-.")[index // 10 % 4]


def _legend(axes) -> None:
    # Beside the plot, not over it: sweeps easily have a dozen series.
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _series_name(row: pd.Series, several_shapes: bool) -> str:
    where = placement(row["ring_size"], row["world_size"])
    name = row["label"] if where == NO_RING else f"{row['label']} ({where})"
    return f"{name}, {shape_title(tuple(row[SHAPE]))}" if several_shapes else name


def _against_seq_len(frame: pd.DataFrame, column: str, ylabel: str, title: str) -> Figure | None:
    measured = frame[frame["status"].isin(records.MEASURED) & frame[column].notna()]
    if measured.empty:
        return None
    several_shapes = measured.groupby(SHAPE).ngroups > 1
    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    named = measured.assign(series=[_series_name(row, several_shapes) for _, row in measured.iterrows()])
    for index, (series, points) in enumerate(named.groupby("series", sort=False)):
        points = points.sort_values("seq_len")
        axes.plot(points["seq_len"], points[column], marker="o", linestyle=_style(index), label=series)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    _legend(axes)
    axes.grid(True, which="both", alpha=0.3)
    return figure


def _scaling(frame: pd.DataFrame) -> Figure | None:
    measured = frame[frame["status"].isin(records.MEASURED) & frame["tflops_per_device"].notna()]
    if not (measured["world_size"] > 1).any():
        return None
    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    distributed = measured[measured["implementation"].isin(measured.loc[measured["world_size"] > 1, "implementation"])]
    for (label, seq_len, causal), points in distributed.groupby(["label", "seq_len", "causal"], sort=False):
        if points["world_size"].max() == 1:
            continue  # measured in one process only: nothing to scale
        points = points[(points["world_size"] > 1) | (points["ring_size"].fillna(1) == 1)].sort_values("world_size")
        axes.plot(points["world_size"], points["tflops_per_device"], marker="o", linestyle=_style(len(axes.lines)),
                  label=f"{label} S={seq_len}{' causal' if causal else ''}")
    axes.set_xticks(sorted(distributed["world_size"].unique()))
    axes.set_xlabel("processes (one device each)")
    axes.set_ylabel("TFLOP/s per device")
    axes.set_title("Scaling with the number of processes")
    _legend(axes)
    axes.grid(True, alpha=0.3)
    return figure


def figures(frame: pd.DataFrame) -> dict[str, Figure]:
    """The run's figures by short name; a figure without data to show is left out."""
    candidates = {
        "time": _against_seq_len(frame, "median_ms", "median time (ms)", "Time against sequence length"),
        "memory": _against_seq_len(frame, "total_mib", "memory in all: held + peak (MiB)",
                                   "Memory per device against sequence length"),
        "throughput": _against_seq_len(frame, "tflops_per_device", "TFLOP/s per device",
                                       "Throughput against sequence length"),
        "scaling": _scaling(frame),
    }
    return {name: figure for name, figure in candidates.items() if figure is not None}


def save(figures_by_name: dict[str, Figure], folder: Path, prefix: str) -> list[tuple[str, str]]:
    """Write each figure as PNG into ``folder``; returns (name, file name) for the report's links."""
    written = []
    for name, figure in figures_by_name.items():
        file_name = f"{prefix}{name}.png"
        figure.savefig(folder / file_name, dpi=110, bbox_inches="tight")
        written.append((name, file_name))
    return written
