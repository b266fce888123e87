"""Figures of a run: time, memory per device and throughput against sequence length, one panel
per shape, and, for runs across processes, efficiency against the number of processes and the
scaling model's projection. Drawn with matplotlib's object API (no pyplot, no display), so they
render headless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ringbench import records
from ringbench.report import model, scaling
from ringbench.report.summary import efficiencies, peer_name
from ringbench.report.tables import SHAPE, shape_title
from ringbench.vocabulary import placement, series_name

PANEL = (8.0, 4.5)  # inches: at 110 dpi, about the width of a page's text column


def _style(index: int) -> str:
    """Past the ten colours of the cycle, lines differ by dash pattern too."""
    return ("-", "--", ":", "-.")[index // 10 % 4]


def _legend(figure: Figure, panels: list[Axes]) -> None:
    """One legend under all panels, each series once: beside the plot, a dozen names would squeeze
    it on a narrow page."""
    named: dict[str, Artist] = {}
    for axes in panels:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            named.setdefault(label, handle)
    figure.legend(
        list(named.values()), list(named), loc="outside lower center", ncol=2, fontsize="small", frameon=False
    )


def _series_name(row: pd.Series) -> str:
    return series_name(row["label"], placement(row["ring_size"], row["world_size"]))


def _panels(groups: list[tuple[str, pd.DataFrame]], title: str) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per group, each titled by its shape where there are several."""
    figure = Figure(figsize=(PANEL[0], PANEL[1] * len(groups)), layout="constrained")
    panels = figure.subplots(len(groups), 1, squeeze=False)[:, 0]
    if len(groups) > 1:
        figure.suptitle(title)
    for axes, (key, _) in zip(panels, groups):
        axes.set_title(title if len(groups) == 1 else key)
    return figure, list(panels)


def _against_seq_len(frame: pd.DataFrame, column: str, ylabel: str, title: str) -> Figure | None:
    measured = frame[frame["status"].isin(records.MEASURED) & frame[column].notna()]
    if measured.empty:
        return None
    groups = [(shape_title(key), group) for key, group in measured.groupby(SHAPE, sort=False)]
    figure, panels = _panels(groups, title)
    for axes, (_, group) in zip(panels, groups):
        named = group.assign(series=[_series_name(row) for _, row in group.iterrows()])
        for index, (series, points) in enumerate(named.groupby("series", sort=False)):
            points = points.sort_values("seq_len")
            axes.plot(points["seq_len"], points[column], marker="o", linestyle=_style(index), label=series)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("sequence length (tokens)")
        axes.set_ylabel(ylabel)
        axes.grid(True, which="both", alpha=0.3)
    _legend(figure, panels)
    return figure


def _efficiency(frame: pd.DataFrame) -> Figure | None:
    """Per-device TFLOP/s over the single-device peer with the same kernel, against the number of
    processes: one panel per pass, one line per implementation, length and masking, 1 being ideal."""
    pairs = efficiencies(frame)
    if not pairs:
        return None
    points = pd.DataFrame(
        [
            {
                "pass": row["pass"],
                "processes": row.world_size,
                "efficiency": row.tflops_per_device / base.tflops_per_device,
                "series": f"{row.label} S={row.seq_len}{' causal' if row.causal else ''}",
            }
            for row, base in pairs
        ]
    )
    groups = [(f"{pass_name}", group) for pass_name, group in points.groupby("pass", sort=False)]
    peer = peer_name(frame)
    figure, panels = _panels(groups, "Efficiency across processes")
    for axes, (_, group) in zip(panels, groups):
        axes.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=f"ideal: single-device {peer}'s rate")
        for index, (series, line) in enumerate(group.groupby("series", sort=False)):
            line = line.sort_values("processes")
            axes.plot(line["processes"], line["efficiency"], marker="o", linestyle=_style(index), label=series)
        axes.set_xticks([1, *sorted(points["processes"].unique())])
        axes.set_xlabel("processes (one device each)")
        axes.set_ylabel(f"per-device TFLOP/s over single-device {peer}")
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
    _legend(figure, panels)
    return figure


def _scaling(frame: pd.DataFrame, calibration: dict[int, dict[str, Any]]) -> Figure | None:
    """The scaling model's projection of the peer's first kernel and shape (forward+backward,
    non-causal where it ran): per-GPU efficiency against GPUs, one panel per sequence length, one
    line each for `ring`, `ulysses` and the best `usp` of another degree."""
    projected = scaling.projections(frame, calibration)
    if projected is None:
        return None
    found = [projection for projection in projected[1] if any(projection.predictions.values())]
    if not found:
        return None
    chosen = next((p for p in found if p.pass_name == model.BOTH and not p.causal), found[0])
    tokens = [scaling.PROJECTED_TOKENS[0], 2**20, scaling.PROJECTED_TOKENS[-1]]
    causal = "causal" if chosen.causal else "non-causal"
    groups = [(f"{scaling.tokens_text(count)} tokens, {chosen.pass_name}, {causal}", count) for count in tokens]
    figure, panels = _panels([(title, pd.DataFrame()) for title, _ in groups], "Scaling model: projection")
    for axes, (_, count) in zip(panels, groups):
        for index, strategy in enumerate(("ring", "ulysses", "usp")):
            points = []
            for world in scaling.PROJECTED_GPUS:
                named = chosen.predictions.get((world, count), {})
                matching = [m for name, m in named.items() if name.split()[0] == strategy]
                if matching:
                    points.append((world, max(m.efficiency for m in matching)))
            if points:
                label = "usp, best degree" if strategy == "usp" else strategy
                axes.plot(*zip(*points), marker="o", linestyle=_style(index), label=label)
        axes.set_xscale("log", base=2)
        axes.set_xlabel("GPUs")
        axes.set_ylabel("modelled per-GPU efficiency")
        axes.set_ylim(0, 1.1)
        axes.grid(True, alpha=0.3)
    _legend(figure, panels)
    return figure


def figures(frame: pd.DataFrame, calibration: dict[int, dict[str, Any]] | None = None) -> dict[str, Figure]:
    """The run's figures by short name; a figure without data to show is left out.

    Memory is what one device holds for a cell: for a one-device ring, as one rank
    of it would (its share computed alone, from the projection), so that the
    memory a ring saves per device shows.
    """
    per_device = frame.assign(device_mib=frame["projected_total_mib"].fillna(frame["total_mib"]))
    candidates = {
        "time": _against_seq_len(frame, "median_ms", "median time (ms)", "Time against sequence length"),
        "memory": _against_seq_len(
            per_device, "device_mib", "memory a device holds (MiB)", "Memory per device, as a rank holds it"
        ),
        "throughput": _against_seq_len(
            frame, "tflops_per_device", "TFLOP/s per device", "Throughput against sequence length"
        ),
        "efficiency": _efficiency(frame),
        "scaling": _scaling(frame, calibration or {}),
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
