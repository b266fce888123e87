"""Metric tables: a row per implementation and placement, a column per sequence length, failures
written in place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from ringbench import records
from ringbench.report.markdown import escape, mib, ms, table, tflops
from ringbench.vocabulary import placement

FAILED = {records.OOM: "OOM", records.ERROR: "error", records.SKIPPED: "skipped"}
SHAPE = ["pass", "dtype", "causal", "batch_size", "heads", "head_dim"]


def _present(column: str) -> Callable[[pd.DataFrame], bool]:
    return lambda group: bool(group[column].notna().any())


def _across_processes(group: pd.DataFrame) -> pd.DataFrame:
    return group[group["world_size"] > 1]


def _beside(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The cells with a value in ``column``, and the failed cells at lengths where some cell has one."""

    def cells(group: pd.DataFrame) -> pd.DataFrame:
        lengths = group.loc[group[column].notna(), "seq_len"].unique()
        return group[group[column].notna() | ((group["status"] != records.OK) & group["seq_len"].isin(lengths))]

    return cells


# A model's figure is shown beside the measured one where they differ by more than this.
MODEL_DIFFERS = 0.01


def _measured_in(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The cells with a value in ``column``, and the failed ones (which say how they failed)."""
    return lambda group: group[group[column].notna() | (group["status"] != records.OK)]


def _memory(row) -> str:
    if pd.isna(row.modelled_mib) or abs(row.peak_mib - row.modelled_mib) <= MODEL_DIFFERS * max(row.modelled_mib, 1.0):
        return mib(row.peak_mib)
    return f"{mib(row.peak_mib)} (model {mib(row.modelled_mib)})"


def _throughput(row) -> str:
    if pd.isna(row.peak_tflops):
        return tflops(row.tflops_per_device)
    return f"{tflops(row.tflops_per_device)} ({row.tflops_per_device / row.peak_tflops:.0%})"


def _clock(row) -> str:
    if pd.isna(row.sm_clock_mhz):
        return ""
    held = f" ({row.clock_held_by})" if row.clock_held_by else ""
    return f"{row.sm_clock_mhz:,.0f} of {row.sm_clock_top_mhz:,.0f}{held}"


def _communication(row) -> str:
    if pd.isna(row.comm_wait_share):
        return ""
    # Records before schema 4 kept the mean of one ring step's message instead, and say so.
    sent = (
        f"{row.comm_call_mib:,.2f} MiB"
        if pd.notna(row.comm_call_mib)
        else f"{row.comm_step_mib:,.2f} MiB per ring step"
    )
    # A ring whose options did not name NCCL says which transfers ran, and why point-to-point where it fell back.
    by = f", {row.transfers}" if isinstance(row.transfers, str) else ""
    return f"{sent}, {row.comm_wait_share:.1%}{by}"


def _error(row) -> str:
    """The output's relative error and, in backward passes, the gradients'; saying so where a
    record carries no check (an implementation registered without a reference, or an old record)."""
    if not row.checked:
        return "not checked"
    forward = "n/a" if pd.isna(row.rel_error) else f"{row.rel_error:.1e}"
    if row.gradients_checked is None or pd.isna(row.gradients_checked):
        return forward
    return f"{forward} / {row.grad_rel_error:.1e}" if row.gradients_checked else f"{forward} / not checked"


# Plain calls' time is shown beside graph replays' where they differ by more than this.
PLAIN_DIFFERS = 0.05


def _plain_differs(group: pd.DataFrame) -> pd.DataFrame:
    """The cells timed as graph replays whose plain calls took materially longer or shorter."""
    return group[group["plain_ms"].notna() & ((group["plain_ms"] / group["median_ms"] - 1).abs() > PLAIN_DIFFERS)]


@dataclass(frozen=True)
class Metric:
    title: str
    text: Callable[[pd.Series], str]  # for a row that was measured
    shown: Callable[[pd.DataFrame], bool] = lambda group: True
    absent: str = ""  # said instead of the table when it is not shown
    rows_with: str | None = None  # only implementations with a value in this column get rows
    cells: Callable[[pd.DataFrame], pd.DataFrame] | None = None  # the cells the table is about, if not all


METRICS = (
    Metric(
        "Median time (ms ± IQR); a call whose launch outweighs its GPU work is timed as CUDA-graph replays",
        lambda row: f"{ms(row.median_ms)} ± {ms(row.iqr_ms)}",
    ),
    Metric(
        f"Plain calls' median time (ms), where the replays' differs from it by over {PLAIN_DIFFERS:.0%}: "
        "the host's launch included",
        lambda row: ms(row.plain_ms),
        lambda group: not _plain_differs(group).empty,
        cells=_plain_differs,
    ),
    Metric(
        "Throughput per device (TFLOP/s; in brackets, share of the measured matmul peak where known)",
        _throughput,
        _present("tflops"),
    ),
    Metric(
        "SM clock while the samples ran (MHz, mean; across processes the slowest GPU's) of the board's top, "
        "and what held a GPU's clock below its top",
        _clock,
        _present("sm_clock_mhz"),
        rows_with="sm_clock_mhz",
    ),
    Metric(
        "Peak memory of a call above what it starts with (inputs, buffers kept by setup), MiB; the model's "
        f"figure in brackets where it differs by over {MODEL_DIFFERS:.0%}",
        _memory,
        _present("peak_mib"),
        "not measured on the CPU.",
    ),
    Metric(
        "Memory in all, per device: what a call starts with (inputs or a rank's shards, buffers kept by setup, "
        "library workspaces) and its peak above that, MiB",
        lambda row: mib(row.total_mib),
        _present("total_mib"),
        rows_with="total_mib",
    ),
    Metric(
        "Speed-up against `{baseline}`: its median time over this one",
        lambda row: f"{row.speedup:.2f}×",
        _present("speedup"),
        cells=_beside("speedup"),
    ),
    Metric(
        "Memory in all against `{baseline}`: what this call needs on its device over what the baseline needs",
        lambda row: f"{row.memory_ratio:.3g}×",
        _present("memory_ratio"),
        cells=_beside("memory_ratio"),
    ),
    Metric(
        "Projected per rank: one rank's share computed alone, median time (ms ± IQR)",
        lambda row: f"{ms(row.projected_ms)} ± {ms(row.projected_iqr_ms)}",
        _present("projected_ms"),
        rows_with="projected_ms",
        cells=_measured_in("projected_ms"),
    ),
    Metric(
        "Projected per rank: one rank's share computed alone, peak memory above what its call starts with (MiB)",
        lambda row: mib(row.projected_mib),
        _present("projected_mib"),
        rows_with="projected_mib",
        cells=_measured_in("projected_mib"),
    ),
    Metric(
        "Communication per rank: MiB sent to other ranks in one call, share of the call spent waiting for transfers",
        _communication,
        _present("comm_wait_share"),
        rows_with="comm_wait_share",
        cells=_across_processes,
    ),
    Metric("Tokens per second", lambda row: f"{row.tokens_per_s:,.0f}"),
    Metric("Relative error against the float64 reference (output / gradients, in backward passes)", _error),
)


def shape_words(key: tuple) -> list[str]:
    """A shape's values (a ``SHAPE`` key) as words, in ``SHAPE``'s order."""
    pass_name, dtype, causal, batch, heads, head_dim = key
    return [pass_name, dtype, "causal" if causal else "non-causal", f"B={batch}", f"H={heads}", f"D={head_dim}"]


def shape_title(key: tuple) -> str:
    *situation, batch, heads, head_dim = shape_words(key)
    return " · ".join([*situation, f"{batch} {heads} {head_dim}"])


def _cell_text(metric: Metric, row) -> str:
    if row.status not in records.MEASURED:
        return FAILED.get(row.status, row.status)
    text = metric.text(row)
    return f"{text} (wrong)" if row.status == records.WRONG and text else text


def metric_table(group: pd.DataFrame, metric: Metric) -> str:
    if metric.cells:
        group = metric.cells(group)
    if metric.rows_with:
        labels = group.loc[group[metric.rows_with].notna(), "label"].unique()
        group = group[group["label"].isin(labels)]
    # One pass over the cells: a row per implementation and placement, in the order they first appear.
    rows: dict[tuple[str, object], dict[int, str]] = {}
    for row in group.itertuples():
        key = (row.label, placement(row.ring_size, row.world_size))
        rows.setdefault(key, {}).setdefault(row.seq_len, _cell_text(metric, row))
    labels = list(dict.fromkeys(label for label, _ in rows))
    # A length only rows without this metric would fill gets no column.
    lengths = sorted({seq_len for texts in rows.values() for seq_len, text in texts.items() if text})
    frame = pd.DataFrame(
        [
            [escape(label), str(run_as), *(rows[label, run_as].get(seq_len, "") for seq_len in lengths)]
            for label, run_as in sorted(rows, key=lambda key: (labels.index(key[0]), key[1]))
        ],
        columns=["implementation", "run as", *(f"S={seq_len}" for seq_len in lengths)],
    )
    return table(frame, text_columns=2)


def tolerances(group: pd.DataFrame) -> str | None:
    """The relative error each implementation's cells may reach here (its dtype's, or coarser where it
    accumulates in a coarser type), and what checking cost; None where nothing was checked."""
    checked = group[group["checked"].astype(bool) & group["tolerance"].notna()]
    if checked.empty:
        return None
    allowed = "; ".join(
        f"{escape(label)} {cells['tolerance'].max():.0e}" for label, cells in checked.groupby("label", sort=False)
    )
    cost = checked["check_s"].dropna()
    spent = f" Checks took {cost.sum():.1f} s in all, at most {cost.max():.2f} s a cell." if not cost.empty else ""
    return f"Tolerance: {allowed}.{spent}"


def failures(group: pd.DataFrame) -> str | None:
    """A table of the failed cells: where, status, and the (escaped, shortened) message; None if none failed."""
    rows = []
    for row in group[group["status"] != records.OK].itertuples():
        if row.status == records.WRONG:
            message = (
                f"relative error {_error(row)} exceeds the tolerance {row.tolerance:.0e} "
                f"({int(row.rows_checked)} rows checked)"
            )
        else:
            message = escape(f"{row.error_type}: {row.error_message}", limit=300)
        where = placement(row.ring_size, row.world_size)
        rows.append(
            {
                "cell": f"{escape(row.label)} S={row.seq_len}{'' if where.whole else f' ({where})'}",
                "status": FAILED.get(row.status, row.status),
                "message": message,
            }
        )
    return table(pd.DataFrame(rows)) if rows else None
