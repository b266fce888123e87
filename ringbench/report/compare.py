"""Comparing two runs cell by cell: did a change make anything faster, slower, or broken?

Cells are matched by id, and a cell left unmatched with the one cell of the other run that has
its label and every other parameter (an option added to the implementation, or its default
changed, between the runs alters the id but not the label); or, given two labels, the cells of
one implementation (as labelled) in the base run with those of another in the new run (one run
may be both), matched by every other parameter. A measured pair's verdict needs both a ratio of medians
beyond the threshold and a Mann-Whitney U test on the raw samples below ``alpha``:
a large ratio on noisy samples, or a significant but tiny shift, is "unchanged".
A cell measured on different GPUs in the two runs — those its processes ran on, the
host's first — is not compared at all ("incomparable"); other environment
differences are listed as warnings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ringbench import records
from ringbench.errors import UserError
from ringbench.report.markdown import escape, ms, table
from ringbench.run.stats import mann_whitney_p
from ringbench.schema import Record
from ringbench.vocabulary import option_text

FASTER, SLOWER, UNCHANGED = "faster", "slower", "unchanged"
NEWLY_FAILING, FIXED, STILL_FAILING = "newly failing", "fixed", "still failing"
ONLY_BASE, ONLY_NEW, INCOMPARABLE = "only in base", "only in new", "incomparable"
_ENVIRONMENT_KEYS = ("torch", "cuda", "cudnn", "nccl", "driver")


@dataclass
class Comparison:
    base: Path
    new: Path
    labels: tuple[str, str] | None = None  # the implementations compared, as labelled; None: cell by cell
    rows: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _latest(run_dir: Path) -> dict[str, Record]:
    return {record.cell_id: record for record in records.read_records(run_dir)}


def _situation(record: Record) -> tuple:
    """A cell's parameters but its implementation, options and ring size."""
    return (
        record.seq_len,
        record.world_size,
        record.batch_size,
        record.heads,
        record.head_dim,
        record.dtype,
        record.causal,
        record.pass_name,
    )


def _labelled(stored: dict[str, Record], label: str, run_dir: Path) -> list[Record]:
    chosen = [record for record in stored.values() if record.display_label == label]
    if not chosen:
        known = ", ".join(sorted({record.display_label for record in stored.values()})) or "none"
        raise UserError(f"{run_dir}: no cells labelled '{label}' (its labels: {known})")
    return chosen


def _pairs(
    base_records: dict[str, Record],
    new_records: dict[str, Record],
    labels: tuple[str, str] | None,
    runs: tuple[Path, Path],
) -> list[tuple[Record | None, Record | None]]:
    """(base, new) records to compare: by cell id; or, with ``labels``, each new cell so labelled with
    the base cell so labelled in the same situation, of the same ring size where the base has several."""
    if labels is None:
        ids = list(base_records) + [cell_id for cell_id in new_records if cell_id not in base_records]
        return _paired_by_label([(base_records.get(cell_id), new_records.get(cell_id)) for cell_id in ids])
    olds, fresh = _labelled(base_records, labels[0], runs[0]), _labelled(new_records, labels[1], runs[1])
    pairs: list[tuple[Record | None, Record | None]] = []
    for new in fresh:
        candidates = [old for old in olds if _situation(old) == _situation(new)]
        if len(candidates) > 1:
            candidates = [old for old in candidates if old.ring_size == new.ring_size]
        pairs.append((candidates[0] if len(candidates) == 1 else None, new))
    paired = {id(old) for old, _ in pairs}
    return pairs + [(old, None) for old in olds if id(old) not in paired]


def _paired_by_label(
    pairs: list[tuple[Record | None, Record | None]],
) -> list[tuple[Record | None, Record | None]]:
    """``pairs`` with each cell found in one run alone joined to the one cell of the other run alone
    that has its label, ring size and situation, where there is exactly one."""

    def key(record: Record) -> tuple:
        return (record.display_label, record.ring_size, _situation(record))

    olds = [old for old, new in pairs if old is not None and new is None]
    fresh = [new for old, new in pairs if new is not None and old is None]
    # Only keys unique on both sides join, so that no record joins two.
    old_counts, new_counts = Counter(map(key, olds)), Counter(map(key, fresh))
    base_of = {key(old): old for old in olds if old_counts[key(old)] == 1}
    joined = {id(new): base_of[key(new)] for new in fresh if new_counts[key(new)] == 1 and key(new) in base_of}
    taken = {id(old) for old in joined.values()}
    return [
        (joined.get(id(new), old), new)
        for old, new in pairs
        if not (new is None and old is not None and id(old) in taken)
    ]


def _option_changes(base: Record, new: Record) -> str:
    """What differs between two records' stored options, as ``a=1 only in new, b: 2 against 3``."""
    before, after = base.options, new.options
    changes = [f"{name}={option_text(value)} only in new" for name, value in after.items() if name not in before]
    changes += [f"{name}={option_text(value)} only in base" for name, value in before.items() if name not in after]
    changes += [
        f"{name}: {option_text(value)} against {option_text(after[name])}"
        for name, value in before.items()
        if name in after and value != after[name]
    ]
    return ", ".join(changes)


def _hardware(environment: dict[str, Any], world_size: int) -> str:
    """What a cell of ``world_size`` processes ran on: the host's first GPUs (one per process), or its CPU.
    A host's other GPUs do not make its cells incomparable."""
    gpus = environment.get("gpus") or []
    if not environment.get("device", "").startswith("cuda") or not gpus:
        return f"CPU: {environment.get('cpu')}"
    return ", ".join(gpu["name"] for gpu in gpus[:world_size])


def _verdict(
    base: Record | None, new: Record | None, threshold: float, alpha: float, comparable: bool
) -> tuple[str, float | None, float | None]:
    """(verdict, ratio, p) for one cell id."""
    if base is None or new is None:
        return (ONLY_NEW if base is None else ONLY_BASE), None, None
    base_ok, new_ok = base.measured, new.measured
    if not (base_ok and new_ok):
        return (
            {(True, False): NEWLY_FAILING, (False, True): FIXED, (False, False): STILL_FAILING}[base_ok, new_ok],
            None,
            None,
        )
    base_ms, new_ms = base.median_ms, new.median_ms
    assert base_ms is not None and new_ms is not None, "measured records carry statistics"
    ratio = new_ms / base_ms
    p = mann_whitney_p(base.samples_ms, new.samples_ms)
    if not comparable:
        return INCOMPARABLE, ratio, p
    if p < alpha and ratio >= threshold:
        return SLOWER, ratio, p
    if p < alpha and ratio <= 1 / threshold:
        return FASTER, ratio, p
    return UNCHANGED, ratio, p


def compare_runs(
    base: Path, new: Path, threshold: float = 1.1, alpha: float = 0.05, labels: tuple[str, str] | None = None
) -> Comparison:
    comparison = Comparison(base, new, labels)
    base_env, new_env = records.read_run(base)["environment"], records.read_run(new)["environment"]
    differing: dict[tuple[str, str], None] = {}
    option_changes: dict[tuple[str, str], None] = {}  # (label, what differs), once each
    for key in _ENVIRONMENT_KEYS:
        if base_env.get(key) != new_env.get(key):
            comparison.warnings.append(f"{key} differs: {base_env.get(key)} against {new_env.get(key)}.")
    base_settings, new_settings = base_env["library_settings"], new_env["library_settings"]
    for name in sorted(base_settings.keys() | new_settings.keys()):
        if base_settings.get(name) != new_settings.get(name):
            comparison.warnings.append(
                f"{name} differs: {base_settings.get(name, 'unset')} against {new_settings.get(name, 'unset')}."
            )
    for old, fresh in _pairs(_latest(base), _latest(new), labels, (base, new)):
        either = fresh or old
        assert either is not None, "each cell id comes from one run or the other"
        hardware = (_hardware(base_env, either.world_size), _hardware(new_env, either.world_size))
        if hardware[0] != hardware[1]:
            differing[hardware] = None
        if old and fresh and old.cell_id != fresh.cell_id and not labels:
            option_changes[(fresh.display_label, _option_changes(old, fresh))] = None
        verdict, ratio, p = _verdict(old, fresh, threshold, alpha, hardware[0] == hardware[1])
        comparison.rows.append(
            {
                # Two implementations' cells: named by their situation, the labels being the title's.
                "cell": either.cell.situation if labels else either.cell.title,
                "base_ms": old.median_ms if old else None,
                "new_ms": fresh.median_ms if fresh else None,
                "ratio": ratio,
                "p": p,
                "verdict": verdict,
            }
        )
    comparison.warnings[:0] = [
        f"Different hardware ({base_hw} against {new_hw}): those cells' timings are not compared."
        for base_hw, new_hw in differing
    ]
    comparison.warnings += [
        f"Cells of {label} matched by label and parameters, their stored options differing: {changes}."
        for label, changes in option_changes
    ]
    return comparison


# Below this a p-value is past what the test's floating point resolves (many thousand samples a
# side give p = 0 exactly): it is shown as a bound, as statistics packages do.
P_FLOOR = 1e-16


def p_text(p: float | None, blank: str = "") -> str:
    """A Mann-Whitney p-value as tables show it: two significant digits, or the floor it lies below."""
    if p is None:
        return blank
    return f"< {P_FLOOR:g}" if p < P_FLOOR else f"{p:.2g}"


def regressions(comparison: Comparison, fail_above: float) -> list[dict[str, Any]]:
    """Rows a CI gate should fail on: slower beyond ``fail_above`` (significantly), or newly failing."""
    return [
        row
        for row in comparison.rows
        if row["verdict"] == NEWLY_FAILING or (row["verdict"] == SLOWER and row["ratio"] > fail_above)
    ]


def render_markdown(comparison: Comparison, threshold: float, alpha: float) -> str:
    counts = pd.Series([row["verdict"] for row in comparison.rows]).value_counts()
    frame = pd.DataFrame(
        [
            {
                "cell": escape(row["cell"]),
                "verdict": row["verdict"],
                "base ms": "" if row["base_ms"] is None else ms(row["base_ms"]),
                "new ms": "" if row["new_ms"] is None else ms(row["new_ms"]),
                "new / base": "" if row["ratio"] is None else f"{row['ratio']:.3f}",
                "p": p_text(row["p"]),
            }
            for row in comparison.rows
        ],
        columns=["cell", "verdict", "base ms", "new ms", "new / base", "p"],
    )
    new, base = f"`{escape(comparison.new.name)}`", f"`{escape(comparison.base.name)}`"
    if comparison.labels:
        base_label, new_label = (escape(label) for label in comparison.labels)
        new, base = f"{new_label} in {new}", f"{base_label} in {base}"
    lines = [
        f"# ringbench compare: {new} against {base}",
        "",
        f"Faster or slower means a ratio of medians beyond {threshold:g}× and a Mann-Whitney U p below {alpha:g}.",
        "",
        "; ".join(f"{verdict}: {count}" for verdict, count in counts.items()),
        "",
        table(frame, text_columns=2),
        "",
    ]
    if comparison.warnings:
        lines += ["## Warnings", "", *(f"- {escape(warning)}" for warning in comparison.warnings), ""]
    return "\n".join(lines)
