"""Findings computed from the records: memory saved against the baseline, reach, speed and crossovers."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from ringbench import records
from ringbench.report.markdown import escape, mib, ms, tflops
from ringbench.report.tables import SHAPE, shape_title, shape_words
from ringbench.vocabulary import GPU_IDLE, PEER, clock_reasons, counted, placement, series_name


def _noisy(row: pd.Series) -> bool:
    return not pd.isna(row.noise_target) and not pd.isna(row.rel_iqr) and row.rel_iqr > row.noise_target


NOISY = " — ⚠ rests on a cell timed above the noise target ({noise:.1%} IQR / median)"


def _noise_mark(rows: list[pd.Series]) -> str:
    """What a finding adds when one of the cells it rests on is noisier than the target allows."""
    noisy = [row.rel_iqr for row in rows if _noisy(row)]
    return NOISY.format(noise=max(noisy)) if noisy else ""


def _baseline_row(frame: pd.DataFrame, row: pd.Series, baseline: str) -> pd.Series | None:
    """The baseline's cell that ``row``'s ratios were taken against (see baseline.with_ratios)."""
    same = frame[
        (frame["label"] == baseline)
        & (frame["status"] == records.OK)
        & (frame["world_size"] == 1)
        & (frame["seq_len"] == row.seq_len)
        & (frame[SHAPE] == row[SHAPE]).all(axis=1)
    ]
    return None if same.empty else same.sort_values("ring_size", na_position="first").iloc[0]


def _implementation(row: pd.Series) -> str:
    return series_name(escape(row.label), placement(row.ring_size, row.world_size))


def _varying(cells: pd.DataFrame) -> list[int]:
    """The indices in ``SHAPE`` of the shape's values that differ among ``cells``."""
    return [index for index, column in enumerate(SHAPE) if cells[column].nunique(dropna=False) > 1]


def _cell_names(cells: pd.DataFrame) -> Callable[[pd.Series], str]:
    """How a line tells the rows of ``cells`` apart: implementation, length, and those of the shape's
    values that differ among them."""
    varying = _varying(cells)

    def name(row: pd.Series) -> str:
        words = shape_words(tuple(row[SHAPE]))
        return " ".join([_implementation(row), f"S={row.seq_len}", *(words[index] for index in varying)])

    return name


def best_memory_reduction(frame: pd.DataFrame, baseline: str) -> str:
    """The largest saving of memory in all against the baseline (``memory_ratio``) and where."""
    if frame["peak_mib"].isna().all():
        return "memory is not measured on the CPU"
    if frame["total_mib"].isna().all():
        return "not known: these records predate the memory held when a call starts"
    ok = frame[(frame["status"] == records.OK) & (frame["label"] != baseline) & frame["memory_ratio"].notna()]
    if ok.empty:
        return f"no implementation ran at a shape where `{escape(baseline)}` succeeded with memory measured"
    best = ok.loc[ok["memory_ratio"].idxmin()]
    where = (
        f"{_implementation(best)} at S={best.seq_len} ({shape_title(tuple(best[SHAPE]))}): "
        f"{mib(best.total_mib)} MiB in all against {mib(best.total_mib / best.memory_ratio)} MiB"
        f"{_noise_mark([best, *filter(lambda r: r is not None, [_baseline_row(frame, best, baseline)])])}"
    )
    if best.memory_ratio >= 1:
        return (
            f"none, no implementation held less in all; the closest, {100 * (best.memory_ratio - 1):.1f}% more: {where}"
        )
    return f"{100 * (1 - best.memory_ratio):.1f}% — {where}"


def largest_seq_len(frame: pd.DataFrame) -> list[str]:
    lines = []
    for label, cells in frame.groupby("label", sort=False):
        ok = cells[cells["status"] == records.OK]
        longest = ok["seq_len"].max() if not ok.empty else 0
        # An OOM below a length that ran (at another placement, say) bounds nothing.
        ooms = cells[(cells["status"] == records.OOM) & (cells["seq_len"] > longest)]
        reach = str(longest) if not ok.empty else "none"
        oom = f" (first OOM at {ooms['seq_len'].min()})" if not ooms.empty else ""
        lines.append(f"{escape(label)}: {reach}{oom}")
    return lines


def _sparse(row: pd.Series) -> str:
    """A note where a cell computes less than dense attention (the dilated family): faster is then not
    the same attention done faster."""
    if pd.isna(row.dense_share) or row.dense_share >= 1 - 1e-9:
        return ""
    return f" (sparse: {row.dense_share:.0%} of dense attention's FLOPs)"


def fastest(frame: pd.DataFrame, baseline: str) -> list[str]:
    ok = frame[frame["status"] == records.OK]
    several_shapes = ok.groupby(SHAPE).ngroups > 1
    lines = []
    for key, group in ok.sort_values("seq_len", kind="stable").groupby(SHAPE + ["seq_len"], sort=False):
        if len(group) < 2:  # a length only one cell ran at (a longest-sequence probe, say) ranks nothing
            continue
        best = group.loc[group["median_ms"].idxmin()]
        shape = f" ({shape_title(key[:-1])})" if several_shapes else ""
        against = (
            "" if pd.isna(best.speedup) or best.label == baseline else f", {best.speedup:.2f}× `{escape(baseline)}`"
        )
        # Fastest is a claim against every cell of the length, so any of them being noisy counts.
        mark = _noise_mark([row for _, row in group.iterrows()])
        lines.append(
            f"S={key[-1]}{shape}: {_implementation(best)}, {ms(best.median_ms)} ms{against}{_sparse(best)}{mark}"
        )
    if ok.empty:
        return ["no successful cell"]
    return lines or ["no length ran more than one cell"]


def headline(frame: pd.DataFrame) -> str:
    """A run in a line: the fastest cell at its longest sequence length, among the cells of the run's
    first shape (a causal forward is not faster than a forward+backward in any sense that matters), named
    by the shape's words that vary in the run."""
    ok = frame[frame["status"] == records.OK]
    if ok.empty:
        return "no cell succeeded"
    first = ok[(ok[SHAPE] == ok[SHAPE].iloc[0]).all(axis=1)]
    longest = first[first["seq_len"] == first["seq_len"].max()]
    best = longest.loc[longest["median_ms"].idxmin()]
    words = shape_words(tuple(best[SHAPE]))
    varying = [words[index] for index in _varying(ok)]
    shape = f" ({' · '.join(varying)})" if varying else ""
    return f"fastest at S={best.seq_len}{shape}: {_implementation(best)}, {ms(best.median_ms)} ms{_sparse(best)}"


def crossovers(frame: pd.DataFrame, baseline: str) -> list[str]:
    """Where, going up in sequence length, the fastest implementation changes, and where one
    overtakes the baseline or falls behind it: between which two measured lengths."""
    ok = frame[frame["status"] == records.OK].assign(
        series=[_implementation(row) for _, row in frame[frame["status"] == records.OK].iterrows()]
    )
    base = escape(baseline)
    lines = []
    for key, group in ok.groupby(SHAPE, sort=False):
        times = group.pivot_table(index="seq_len", columns="series", values="median_ms", aggfunc="first").sort_index()
        cells = {(row.seq_len, row.series): row for _, row in group.iterrows()}

        def mark(lengths: tuple[int, int], series: list[str], cells: dict = cells) -> str:  # this shape's cells
            return _noise_mark([cells[(s, name)] for s in lengths for name in series if (s, name) in cells])

        shape = f" ({shape_title(key)})" if ok.groupby(SHAPE).ngroups > 1 else ""
        leaders = times.idxmin(axis=1)
        for (short, before), (long, after) in zip(leaders.items(), list(leaders.items())[1:]):
            # One overtakes another only where both ran at both lengths: a leader that stopped
            # running (out of memory, say) or one that starts only at the longer length overtook nothing.
            if before != after and times.loc[[short, long], [before, after]].notna().all(axis=None):
                lines.append(
                    f"{after} overtakes {before} as the fastest between S={short} and S={long}{shape}"
                    f"{_sparse(cells[(long, after)])}{mark((short, long), [before, after])}"
                )
        if base not in times:
            continue
        for series in [name for name in dict.fromkeys(group["series"]) if name != base]:  # in the run's order
            both = times[[series, base]].dropna()
            ahead = both[series] < both[base]
            for (short, was), (long, now) in zip(ahead.items(), list(ahead.items())[1:]):
                if was != now:
                    verb = "overtakes" if now else "falls behind"
                    lines.append(
                        f"{series} {verb} `{base}` between S={short} and S={long}{shape}"
                        f"{_sparse(cells[(long, series)])}{mark((short, long), [series, base])}"
                    )
    return lines


def efficiencies(frame: pd.DataFrame) -> list[tuple[pd.Series, pd.Series]]:
    """Each multi-process cell with the single-device peer's cell it is measured against (an
    implementation declaring the peer role): the same kernel and shape at the same total sequence
    length, or, where that did not run, the longest sequence it ran."""
    ok = frame[frame["status"] == records.OK]
    baselines = ok[ok[PEER] & (ok["world_size"] == 1)]
    peers = dict(list(baselines.groupby(["kernel", *SHAPE], sort=False)))
    pairs = []
    for _, row in ok[ok["world_size"] > 1].iterrows():
        same = peers.get((row.kernel, *row[SHAPE]))
        if same is None:
            continue
        same = same[same["seq_len"] <= row.seq_len]
        if not same.empty:
            pairs.append((row, same.loc[same["seq_len"].idxmax()]))
    return pairs


def peer_name(frame: pd.DataFrame) -> str:
    """The single-device peer's name as the report writes it: its implementation(s)."""
    return "/".join(dict.fromkeys(frame.loc[frame[PEER], "implementation"])) or "peer"


def ring_efficiency(frame: pd.DataFrame) -> pd.DataFrame:
    """Multi-process implementations side by side: per-device TFLOP/s and, in brackets,
    its ratio to the single-device peer with the same kernel; one row per shape, total
    sequence length, process count and kernel."""
    rows: dict[tuple, dict[str, str]] = {}
    for row, baseline in efficiencies(frame):
        shorter = f" at S={baseline.seq_len}" if baseline.seq_len != row.seq_len else ""
        key = (tuple(row[SHAPE]), row.seq_len, row.world_size, row.kernel)
        entry = rows.setdefault(
            key,
            {
                "shape": shape_title(key[0]),
                "seq_len": str(row.seq_len),
                "processes": str(row.world_size),
                "kernel": escape(row.kernel),
                f"{peer_name(frame)} on one device": f"{tflops(baseline.tflops_per_device)}{shorter}",
            },
        )
        entry[escape(row.label)] = (
            f"{tflops(row.tflops_per_device)} ({row.tflops_per_device / baseline.tflops_per_device:.3f})"
        )
    return pd.DataFrame(list(rows.values())).fillna("")


def efficiency_findings(frame: pd.DataFrame) -> list[str]:
    """Per implementation and process count, the range of its per-device efficiency across the cells,
    marked where a cell or the peer's cell it is set against is noisier than the target allows."""
    pairs: dict[tuple[str, int], list[tuple[pd.Series, pd.Series]]] = {}
    for row, baseline in efficiencies(frame):
        pairs.setdefault((row.label, row.world_size), []).append((row, baseline))
    if not pairs:
        return []
    lines = [
        "- Efficiency across processes: per-device TFLOP/s over single-device "
        f"`{escape(peer_name(frame))}` with the same kernel"
    ]
    for (label, processes), measured in pairs.items():
        values = [row.tflops_per_device / baseline.tflops_per_device for row, baseline in measured]
        spread = (
            f"{min(values):.3f}"
            if len(values) == 1
            else f"{min(values):.3f} to {max(values):.3f} over {len(values)} cells"
        )
        noise = _noise_mark([cell for pair in measured for cell in pair])
        lines.append(f"  - {escape(label)} on {processes} processes: {spread}{noise}")
    return lines


def _throttled(reasons: str | None) -> bool:
    if reasons is None:  # not reported
        return False
    try:
        return int(reasons, 16) & ~GPU_IDLE != 0
    except (TypeError, ValueError):  # not a hex mask: "[N/A]"
        return False


def throttle_reasons(reasons: str | None) -> str:
    """nvidia-smi's hex mask in words: "nothing", or the reasons named."""
    if reasons is None:
        return "not reported"
    try:
        mask = int(reasons, 16)
    except (TypeError, ValueError):
        return "not reported"
    return ", ".join(clock_reasons(mask)) or "nothing"


def _differences(environments: list[dict]) -> list[str]:
    """The environment fields that differ between runs shown together."""
    fields = {
        "GPUs": lambda e: ", ".join(gpu["name"] for gpu in e.get("gpus") or []) or "none",
        "torch": lambda e: e.get("torch"),
        "CUDA": lambda e: e.get("cuda"),
        "cuDNN": lambda e: e.get("cudnn"),
        "driver": lambda e: e.get("driver"),
    }
    return [name for name, read in fields.items() if len({str(read(e)) for e in environments}) > 1]


def warnings(frame: pd.DataFrame, environments: list[dict]) -> list[str]:
    """What a reader should know before trusting the numbers, each with what to do about it."""
    lines = []
    if differing := _differences(environments):
        lines.append(
            f"- The runs shown together differ in {', '.join(differing)}: compare their cells with care, "
            "or rerun them on one machine."
        )
    for environment in environments:
        lines += _environment_warnings(environment)
    return list(dict.fromkeys(lines)) + _noise_warning(frame) + _host_bound_warning(frame) + _clock_warning(frame)


def _environment_warnings(environment: dict) -> list[str]:
    lines = []
    if environment["git"].get("dirty"):
        lines.append(
            "- The git tree had uncommitted changes: the code measured is not exactly the commit named. "
            "Commit, then run again, before citing these numbers."
        )
    for warning in environment.get("overlap_warnings") or []:
        lines.append(f"- {escape(warning)}. Unset it to let communication overlap computation.")
    foreign = environment.get("foreign_processes") or []
    if foreign:
        names = ", ".join(f"{escape(p['name'])} (pid {p['pid']}, {p['memory_mib']} MiB)" for p in foreign)
        lines.append(
            f"- Other processes were computing on the GPUs at the start: {names}. They share the GPUs "
            "with the benchmark; stop them and run again."
        )
    busy = {
        f"{p['name']} (pid {p['pid']})"
        for load in (environment.get("host_load"), environment.get("host_load_end"))
        if load
        for p in load["busy_processes"]
    }
    if busy:
        lines.append(
            f"- Other processes kept the host's CPUs busy at the start or end of the run: "
            f"{escape(', '.join(sorted(busy)))}. They compete with the benchmark for cores and for launching "
            "kernels; stop them and run again."
        )
    unreadable = environment.get("clocks_unreadable")
    if unreadable:
        lines.append(
            f"- The GPUs' clocks could not be read through NVML ({escape(unreadable)}): no cell says what SM "
            "clock its samples ran at, so differences of clock between cells go unseen."
        )
    throttled = [
        state["index"]
        for state in (environment.get("gpu_state") or []) + (environment.get("gpu_state_end") or [])
        if _throttled(state.get("clocks_throttle_reasons.active"))
    ]
    if throttled:
        lines.append(
            f"- GPU {', '.join(sorted(set(throttled)))} reported clock throttle reasons at the start or end "
            "(see `gpu_state` in run.json): clocks may have moved during the run."
        )
    return lines


def _noise_warning(frame: pd.DataFrame) -> list[str]:
    lines = []
    measured = frame[frame["status"].isin(records.MEASURED) & frame["noise_target"].notna()]
    noisy = measured[measured["rel_iqr"] > measured["noise_target"]].sort_values("rel_iqr", ascending=False)
    if not noisy.empty:
        name = _cell_names(measured)
        worst = ", ".join(f"{name(row)} ({row.rel_iqr:.1%})" for _, row in noisy.head(5).iterrows())
        lines.append(
            f"- Noise above the {noisy['noise_target'].iloc[0]:.0%} target (IQR / median) in {len(noisy)} of "
            f"{len(measured)} cells; the noisiest: {worst}. Raise `timing.max_ms` and `timing.max_reps` for more "
            "samples, keep other work off the device, and check clocks for power or thermal throttling; where the "
            "clocks swing, `timing.sample_ms` of a second or more makes each sample span the swing."
        )
    return lines


def _host_bound_warning(frame: pd.DataFrame) -> list[str]:
    """Multi-process cells whose launch outlasts their GPU work: timed in plain calls (no graphs are
    captured across processes), they measure the host's pace."""
    across = frame[(frame["world_size"] > 1) & frame["status"].isin(records.MEASURED)]
    bound = across[across["launch_ms"] >= across["device_ms"]]
    if bound.empty:
        return []
    worst = bound.loc[(bound["launch_ms"] / bound["device_ms"]).idxmax()]
    return [
        f"- In {len(bound)} of {len(across)} multi-process cells the host takes longer to launch a call than "
        f"the GPUs take to run it (the most, {_cell_names(across)(worst)}: "
        f"{worst.launch_ms:.2f} ms of launch against {worst.device_ms:.2f} ms of GPU work): their times measure "
        "the host, as CUDA graphs are not captured across processes. Compare them as the host's, or at "
        "longer sequences."
    ]


# Above this, a cell and the single-device peer's it is set against ran at clocks far enough apart
# to move their efficiency by more than runs of it on one pair of H200s spread (about ±1%).
CLOCKS_DIFFER = 0.02


def _clock_warning(frame: pd.DataFrame) -> list[str]:
    """Multi-process cells whose slowest GPU ran at an SM clock far from the one their single-device
    peer's cell ran at: their efficiency is partly the GPUs' state, not the code."""
    if not frame["sm_clock_mhz"].notna().any():  # no clocks read: on the CPU, or from before records kept them
        return []
    apart = [
        (abs(row.sm_clock_mhz / peer.sm_clock_mhz - 1), row, peer)
        for row, peer in efficiencies(frame)
        if pd.notna(row.sm_clock_mhz) and pd.notna(peer.sm_clock_mhz)
    ]
    apart = [pair for pair in apart if pair[0] > CLOCKS_DIFFER]
    if not apart:
        return []
    _, row, peer = max(apart, key=lambda pair: pair[0])
    return [
        f"- In {counted(len(apart), 'multi-process cell')} the slowest GPU's SM clock was over "
        f"{CLOCKS_DIFFER:.0%} from that of the single-device cell its efficiency is set against (the most, "
        f"{_cell_names(frame[frame['world_size'] > 1])(row)}: {row.sm_clock_mhz:,.0f} against "
        f"{peer.sm_clock_mhz:,.0f} MHz): their efficiency carries that difference, which comes from the "
        "GPUs' power and temperature, not from the code. Read it beside the clock tables under each shape."
    ]


def summary(frame: pd.DataFrame, baseline: str) -> list[str]:
    """The summary section's bullet lines; ``baseline`` is the label ratios are taken against."""
    lines = [
        f"- Best memory reduction against `{escape(baseline)}` at equal shape: "
        f"{best_memory_reduction(frame, baseline)}",
        "- Largest seq_len run without OOM:",
        *(f"  - {line}" for line in largest_seq_len(frame)),
        "- Fastest implementation per seq_len:",
        *(f"  - {line}" for line in fastest(frame, baseline)),
    ]
    crossed = crossovers(frame, baseline)
    if crossed:
        lines += ["- Crossovers:", *(f"  - {line}" for line in crossed)]
    return lines
