"""Findings computed from the records: memory saved against `standard`, reach, and speed."""

from __future__ import annotations

import pandas as pd

from ringbench import records
from ringbench.report.markdown import escape, mib, ms
from ringbench.report.tables import NO_RING, SHAPE, placement, shape_title

BASELINE = "standard"


def _implementation(row: pd.Series) -> str:
    where = placement(row.ring_size, row.world_size)
    return escape(row.label) if where == NO_RING else f"{escape(row.label)} ({where})"


def best_memory_reduction(frame: pd.DataFrame) -> str:
    if frame["peak_mib"].isna().all():
        return "memory is not measured on the CPU"
    ok = frame[(frame["status"] == records.OK) & frame["peak_mib"].notna()]
    baseline = ok[ok["implementation"] == BASELINE]
    if baseline.empty:
        return f"no successful `{BASELINE}` cell with measured memory to compare with"
    keys = SHAPE + ["seq_len"]
    others = ok[ok["implementation"] != BASELINE].merge(
        baseline[keys + ["peak_mib"]].rename(columns={"peak_mib": "baseline_mib"}), on=keys
    )
    others = others[others["baseline_mib"] > 0]
    if others.empty:
        return f"no other implementation ran at a shape where `{BASELINE}` did"
    reduction = 1 - others["peak_mib"] / others["baseline_mib"]
    best = others.loc[reduction.idxmax()]
    return (
        f"{100 * reduction.max():.1f}% — {_implementation(best)} at S={best.seq_len} "
        f"({shape_title(tuple(best[SHAPE]))}): {mib(best.peak_mib)} MiB against {mib(best.baseline_mib)} MiB"
    )


def largest_seq_len(frame: pd.DataFrame) -> list[str]:
    lines = []
    for label, cells in frame.groupby("label", sort=False):
        ok = cells[cells["status"] == records.OK]
        ooms = cells[cells["status"] == records.OOM]
        reach = str(ok["seq_len"].max()) if not ok.empty else "none"
        oom = f" (first OOM at {ooms['seq_len'].min()})" if not ooms.empty else ""
        lines.append(f"{escape(label)}: {reach}{oom}")
    return lines


def fastest(frame: pd.DataFrame) -> list[str]:
    ok = frame[frame["status"] == records.OK]
    several_shapes = ok.groupby(SHAPE).ngroups > 1
    lines = []
    for key, group in ok.groupby(SHAPE + ["seq_len"], sort=False):
        best = group.loc[group["median_ms"].idxmin()]
        shape = f" ({shape_title(key[:-1])})" if several_shapes else ""
        lines.append(f"S={key[-1]}{shape}: {_implementation(best)}, {ms(best.median_ms)} ms")
    return lines or ["no successful cell"]


def ring_efficiency(frame: pd.DataFrame) -> pd.DataFrame:
    """Multi-process implementations side by side: per-device TFLOP/s and, in brackets,
    its ratio to single-device `sdpa` with the same kernel.

    One row per shape, total sequence length, process count and kernel. The
    baseline is `sdpa` at the same total sequence length and shape, or, where that
    did not run, the longest sequence it ran (then named).
    """
    ok = frame[frame["status"] == records.OK]
    baselines = ok[(ok["implementation"] == "sdpa") & (ok["world_size"] == 1)]
    rows: dict[tuple, dict[str, str]] = {}
    for _, row in ok[ok["world_size"] > 1].iterrows():
        same = baselines[(baselines["kernel"] == row.kernel) & (baselines["seq_len"] <= row.seq_len)]
        same = same[(same[SHAPE] == row[SHAPE]).all(axis=1)]
        if same.empty:
            continue
        baseline = same.loc[same["seq_len"].idxmax()]
        shorter = f" at S={baseline.seq_len}" if baseline.seq_len != row.seq_len else ""
        key = (tuple(row[SHAPE]), row.seq_len, row.world_size, row.kernel)
        entry = rows.setdefault(key, {
            "shape": shape_title(key[0]),
            "seq_len": str(row.seq_len),
            "processes": str(row.world_size),
            "kernel": escape(row.kernel),
            "sdpa on one device": f"{baseline.tflops_per_device:,.1f}{shorter}",
        })
        entry[escape(row.label)] = f"{row.tflops_per_device:,.1f} ({row.tflops_per_device / baseline.tflops_per_device:.3f})"
    return pd.DataFrame(list(rows.values())).fillna("")


GPU_IDLE = 0x1  # the one throttle reason that only says nothing was running


def _throttled(reasons: str | None) -> bool:
    try:
        return int(reasons, 16) & ~GPU_IDLE != 0
    except (TypeError, ValueError):  # not reported, or "[N/A]"
        return False


def warnings(frame: pd.DataFrame, environment: dict) -> list[str]:
    """What a reader should know before trusting the numbers, each with what to do about it."""
    lines = []
    if environment["git"].get("dirty"):
        lines.append("- The git tree had uncommitted changes: the code measured is not exactly the commit named. "
                     "Commit, then run again, before citing these numbers.")
    for warning in environment.get("overlap_warnings") or []:
        lines.append(f"- {escape(warning)}. Unset it to let communication overlap computation.")
    foreign = environment.get("foreign_processes") or []
    if foreign:
        names = ", ".join(f"{escape(p['name'])} (pid {p['pid']}, {p['memory_mib']} MiB)" for p in foreign)
        lines.append(f"- Other processes were computing on the GPUs at the start: {names}. They share the GPUs "
                     "with the benchmark; stop them and run again.")
    throttled = [state["index"] for state in (environment.get("gpu_state") or []) + (environment.get("gpu_state_end") or [])
                 if _throttled(state.get("clocks_throttle_reasons.active"))]
    if throttled:
        lines.append(f"- GPU {', '.join(sorted(set(throttled)))} reported clock throttle reasons at the start or end "
                     "(see `gpu_state` in run.json): clocks may have moved during the run.")
    measured = frame[frame["status"].isin(records.MEASURED) & frame["noise_target"].notna()]
    noisy = measured[measured["rel_iqr"] > measured["noise_target"]].sort_values("rel_iqr", ascending=False)
    if not noisy.empty:
        worst = ", ".join(f"{_implementation(row)} S={row.seq_len} ({row.rel_iqr:.1%})" for _, row in noisy.head(5).iterrows())
        lines.append(
            f"- Noise above the {noisy['noise_target'].iloc[0]:.0%} target (IQR / median) in {len(noisy)} of "
            f"{len(measured)} cells; the noisiest: {worst}. Raise `timing.max_ms` and `timing.max_reps` for more samples, keep other work "
            "off the device, and check clocks for power or thermal throttling.")
    return lines


def summary(frame: pd.DataFrame) -> list[str]:
    """The summary section's bullet lines."""
    return [
        f"- Best memory reduction against `{BASELINE}` at equal shape: {best_memory_reduction(frame)}",
        "- Largest seq_len run without OOM:",
        *(f"  - {line}" for line in largest_seq_len(frame)),
        "- Fastest implementation per seq_len:",
        *(f"  - {line}" for line in fastest(frame)),
    ]
