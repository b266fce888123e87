"""Metric tables: rows (implementation, seq_len), one column per ring size, failures written in place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from ringbench import records
from ringbench.report.markdown import escape, mib, ms, table

NO_RING = "no ring"
FAILED = {records.OOM: "OOM", records.ERROR: "error"}
SHAPE = ["pass", "dtype", "causal", "batch_size", "heads", "head_dim"]


@dataclass(frozen=True)
class Metric:
    title: str
    text: Callable[[pd.Series], str]  # for a row whose status is ok
    measured_on_cpu: bool = True


METRICS = (
    Metric("Median time (ms ± IQR)", lambda row: f"{ms(row.median_ms)} ± {ms(row.iqr_ms)}"),
    Metric("Peak memory above inputs (MiB)", lambda row: mib(row.peak_mib), measured_on_cpu=False),
    Metric("Throughput (tokens/s)", lambda row: f"{row.tokens_per_s:,.0f}"),
)


def shape_title(key: tuple) -> str:
    pass_name, dtype, causal, batch, heads, head_dim = key
    return f"{pass_name} · {dtype} · {'causal' if causal else 'non-causal'} · B={batch} H={heads} D={head_dim}"


def _ring_column(ring_size: float | None) -> str:
    return NO_RING if pd.isna(ring_size) else f"ring {int(ring_size)}"


def metric_table(group: pd.DataFrame, metric: Metric) -> str:
    frame = group.assign(
        implementation=group["label"].map(escape),
        column=group["ring_size"].map(_ring_column),
        text=[metric.text(row) if row.status == records.OK else FAILED.get(row.status, row.status)
              for row in group.itertuples()],
    )
    implementations = list(dict.fromkeys(frame["implementation"]))
    rings = sorted(frame["ring_size"].dropna().unique())
    columns = ([NO_RING] if frame["ring_size"].isna().any() else []) + [_ring_column(r) for r in rings]
    pivot = frame.pivot_table(index=["implementation", "seq_len"], columns="column", values="text", aggfunc="first")
    order = sorted(pivot.index, key=lambda key: (implementations.index(key[0]), key[1]))
    pivot = pivot.reindex(index=order, columns=columns).fillna("").reset_index()
    return table(pivot, text_columns=1)


def failures(group: pd.DataFrame) -> list[str]:
    """One bullet per failed cell: where, status, and the (escaped, shortened) message."""
    lines = []
    for row in group[group["status"] != records.OK].itertuples():
        ring = "" if pd.isna(row.ring_size) else f" ring {int(row.ring_size)}"
        message = escape(f"{row.error_type}: {row.error_message}", limit=300)
        lines.append(f"- {escape(row.label)} S={row.seq_len}{ring}: **{FAILED.get(row.status, row.status)}** — {message}")
    return lines
