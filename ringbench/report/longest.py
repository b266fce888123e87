"""The longest-sequence searches of a run (``longest`` in its config): per number of processes, the
longest sequence each implementation ran, where it stopped and how, beside its memory model's
prediction; and, in the findings, how the longest sequence grows with the number of processes.

The searches come from run.json (with the prediction made when the run started: the report never
imports the implementations, whose memory models they are), their probes from the records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from ringbench import records
from ringbench.report.markdown import escape, table
from ringbench.report.tables import FAILED, SHAPE
from ringbench.sweep.longest import SearchSpec, next_probe
from ringbench.vocabulary import Placement, placement

# The shape axes as the table's columns name them, shown where the run's searches differ in them.
_AXES = {"pass": "pass", "dtype": "dtype", "causal": "causal", "batch_size": "B", "heads": "H", "head_dim": "D"}


@dataclass(frozen=True)
class Found:
    """What one search found, from its probes' records."""

    label: str
    where: Placement
    shape: tuple
    peer: bool
    longest: int | None  # the longest probe that ran
    failed: int | None  # the shortest probe above it that did not
    how: str  # how that one failed
    probes: int
    limit: int | None  # the search's bound on probes
    predicted: int | None  # the memory model's longest, where there is one
    finished: bool  # False for a run stopped before the search's last probe

    @property
    def processes(self) -> int:
        return self.where.count if self.where.kind == 2 else 1


def _key(entry: Any) -> tuple:
    return (entry["label"], placement(entry["ring_size"], entry["world_size"]), *(entry[axis] for axis in SHAPE))


def found(frame: pd.DataFrame, searches: list[dict[str, Any]], peers: set[str]) -> list[Found]:
    """Each search of run.json with what its recorded probes found; ``peers`` are the implementations
    declaring the single-device peer role."""
    by_key: dict[tuple, list[tuple[int, str]]] = {}
    for _, row in frame.iterrows():
        by_key.setdefault(_key(row), []).append((int(row.seq_len), row.status))
    results = []
    for search in searches:
        probes = by_key.get(_key(search), [])
        longest = max((s for s, status in probes if status == records.OK), default=None)
        above = sorted((s, status) for s, status in probes if status != records.OK and (longest is None or s > longest))
        failed, status = above[0] if above else (None, "")
        results.append(
            Found(
                label=search["label"],
                where=placement(search["ring_size"], search["world_size"]),
                shape=tuple(search[axis] for axis in SHAPE),
                peer=search["implementation"] in peers,
                longest=longest,
                failed=failed,
                how=FAILED.get(status, status),
                probes=len(probes),
                limit=search["max"],
                predicted=search["predicted"],
                finished=next_probe(
                    SearchSpec(search["start"], search["granularity"], search["max"]),
                    {seq_len: status == records.OK for seq_len, status in probes},
                )
                is None,
            )
        )
    return results


def _tokens(value: int | None) -> str:
    return "none" if value is None else f"{value:,}"


def _bases(result: Found, results: list[Found]) -> list[Found]:
    """What ``result`` is set against: the same implementation's search in one process, and the
    single-device peer's (where that is another implementation), at the same shape; those that found
    a length that ran."""
    ones = [other for other in results if other.processes == 1 and other.shape == result.shape and other.longest]
    own = next((other for other in ones if other.label == result.label), None)
    peer = next((other for other in ones if other.peer and other.label != result.label), None)
    return [base for base in (own, peer) if base is not None]


def _ratio(result: Found, results: list[Found]) -> str:
    if result.longest is None:
        return "—"
    parts = []
    for base in _bases(result, results):
        assert base.longest is not None, "only a search that found a length is set against"
        named = "" if base.label == result.label else f" {escape(base.label)}"
        parts.append(f"{result.longest / base.longest:.2f}×{named}")
    return "; ".join(parts) or "—"


def tables(results: list[Found]) -> list[str]:
    """The section's Markdown: a table per number of processes, a row per implementation (and shape
    axis where the searches differ in it)."""
    varying = [axis for index, axis in enumerate(SHAPE) if len({r.shape[index] for r in results}) > 1]
    lines = []
    for processes in sorted({r.processes for r in results}):
        rows = []
        for result in (r for r in results if r.processes == processes):
            shape = dict(zip(SHAPE, result.shape))
            if not result.finished:
                failed = "not searched to the end"
            elif result.failed is not None:
                failed = f"{_tokens(result.failed)} ({result.how})"
            else:
                failed = f"none up to {_tokens(result.limit)}"
            rows.append(
                {
                    "implementation": escape(result.label) + ("" if result.where.kind != 1 else f" ({result.where})"),
                    **{_AXES[axis]: escape(str(shape[axis]).lower()) for axis in varying},
                    "longest that ran": _tokens(result.longest),
                    "shortest that failed": failed,
                    "probes": str(result.probes),
                    "model": "—" if result.predicted is None else _tokens(result.predicted),
                    **({"against 1 process": _ratio(result, results)} if processes > 1 else {}),
                }
            )
        heading = "1 process" if processes == 1 else f"{processes} processes"
        lines += [f"**{heading}**", "", table(pd.DataFrame(rows), text_columns=1 + len(varying)), ""]
    return lines


def findings(results: list[Found]) -> list[str]:
    """A line per implementation and shape searched on several processes: its longest sequence at
    each number of processes, and the growth over one process."""
    lines = []
    groups: dict[tuple, list[Found]] = {}
    for result in results:
        groups.setdefault((result.label, result.shape), []).append(result)
    several_shapes = len({r.shape for r in results}) > 1
    for (label, shape), group in groups.items():
        if all(r.processes == 1 for r in group):
            continue
        what = " · ".join(str(axis).lower() for axis in shape) if several_shapes else shape[0]
        steps = []
        for index, result in enumerate(sorted(group, key=lambda r: r.processes)):
            count = result.processes
            at = f"{count} process{'es' if count > 1 else ''}" if index == 0 else str(count)
            ratio = _ratio(result, results) if count > 1 else "—"
            steps.append(f"{_tokens(result.longest)} at {at}" + ("" if ratio == "—" else f" ({ratio})"))
        lines.append(f"  - `{escape(label)}` {escape(what)}: {' → '.join(steps)}")
    return ["- Longest sequence that runs, by number of processes:", *lines] if lines else []
