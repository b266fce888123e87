"""Every cell against a chosen baseline implementation at the same shape and sequence length."""

from __future__ import annotations

import pandas as pd

from ringbench import records
from ringbench.errors import UserError
from ringbench.report.tables import SHAPE
from ringbench.vocabulary import BASELINE, PEER


def resolve(frame: pd.DataFrame, baseline: str | None) -> str | None:
    """The label ratios are taken against: the one ``baseline`` names (a label, or an implementation
    run with one set of options), or by default the first implementation declaring the baseline
    role, else the first declaring the peer role, else the first. None when no cell is there to
    compare with."""
    labels = list(dict.fromkeys(frame["label"]))
    if not labels:
        return None
    if baseline is None:
        named = [label for role in (BASELINE, PEER) for label in dict.fromkeys(frame.loc[frame[role], "label"])]
        return (named or labels)[0]
    if baseline in labels:
        return baseline
    matching = list(dict.fromkeys(frame.loc[frame["implementation"] == baseline, "label"]))
    if len(matching) > 1:
        raise UserError(f"--baseline: {baseline!r} ran with several option sets; name one of {', '.join(matching)}")
    if not matching:
        raise UserError(
            f"--baseline: {baseline!r} is not among the implementations in these runs ({', '.join(labels)})"
        )
    return matching[0]


def with_ratios(frame: pd.DataFrame, label: str | None) -> pd.DataFrame:
    """Adds ``speedup`` (the baseline's median time over the cell's) and ``memory_ratio``
    (the memory the cell needs in all, ``total_mib``, over the baseline's), where the
    baseline succeeded. In all, so that buffers an implementation keeps from setup (a
    sharded copy of the inputs, say) count against it.

    The baseline's cell is its first placement: one process, no ring or the smallest.
    """
    empty = frame.assign(speedup=float("nan"), memory_ratio=float("nan"))
    if label is None:
        return empty
    keys = SHAPE + ["seq_len"]
    base = frame[(frame["label"] == label) & (frame["status"] == records.OK) & (frame["world_size"] == 1)]
    base = base.sort_values("ring_size", na_position="first").drop_duplicates(keys)
    base = base[keys + ["median_ms", "total_mib"]].rename(columns={"median_ms": "base_ms", "total_mib": "base_mib"})
    merged = frame.merge(base, on=keys, how="left")
    merged["speedup"] = merged["base_ms"] / merged["median_ms"]
    merged["memory_ratio"] = merged["total_mib"] / merged["base_mib"].where(merged["base_mib"] > 0)
    return merged.drop(columns=["base_ms", "base_mib"]).set_axis(frame.index)
