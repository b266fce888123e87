"""Assembling the Markdown report of one or several runs."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from ringbench.report import longest, plots, scaling
from ringbench.report.baseline import resolve, with_ratios
from ringbench.report.load import Run
from ringbench.report.markdown import escape, table
from ringbench.report.summary import (
    efficiency_findings,
    peer_name,
    ring_efficiency,
    summary,
    throttle_reasons,
    warnings,
)
from ringbench.report.tables import METRICS, SHAPE, failures, metric_table, shape_title, tolerances
from ringbench.vocabulary import PEER, counted, label_of, placement


def _heading(level: int, text: str) -> str:
    return f"{'#' * level} {text}"


def stamp_date(environment: dict[str, Any]) -> str:
    return datetime.fromisoformat(environment["date_utc"]).strftime("%Y-%m-%d %H:%M:%S UTC")


def stamp_commit(git: dict[str, Any]) -> str:
    commit = git.get("commit", "unknown")
    short = commit[:8] if commit != "unknown" else commit
    return f"{short} (dirty)" if git.get("dirty") else short


def _ringbench_line(environment: dict[str, Any]) -> list[str]:
    """ringbench's version, and its checkout's commit where it ran from one (runs from before say nothing)."""
    source = environment.get("ringbench")
    if not source:
        return []
    commit = f", commit {stamp_commit(source)}" if source.get("commit") else ""
    return [f"**ringbench**: {escape(source['version'])}{commit}  "]


def _gpus_used(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPUs a run's cells used on its first host: as many as the most processes a cell (or a
    search's probes) ran on, at most those the host has; none on the CPU."""
    environment = meta["environment"]
    if not environment["device"].startswith("cuda"):
        return []
    processes = max((cell.get("world_size", 1) for cell in [*meta["planned"], *meta.get("searches", [])]), default=1)
    return (environment.get("gpus") or [])[:processes]


def devices(meta: dict[str, Any]) -> str:
    """``NVIDIA H200 ×2``, or the CPU: what a run measured on, in short."""
    gpus = _gpus_used(meta)
    if gpus:
        return f"{' / '.join(dict.fromkeys(gpu['name'] for gpu in gpus))} ×{len(gpus)}"
    return f"CPU: {meta['environment'].get('cpu')} ({meta['environment'].get('cpu_count')} cores)"


def _hardware(meta: dict[str, Any]) -> str:
    environment, gpus = meta["environment"], _gpus_used(meta)
    if not gpus:
        return devices(meta)
    return (
        f"{devices(meta)} ({gpus[0]['memory_mib']:,} MiB each), driver {environment.get('driver')}, "
        f"CUDA {environment.get('cuda')}, cuDNN {environment.get('cudnn')}"
    )


def _values(values: list[Any]) -> str:
    return ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)


def _resolved(frame: pd.DataFrame) -> list[str]:
    """What implementations reported choosing (e.g. the kernel behind ``backend=auto``), per implementation."""
    chosen = frame.dropna(subset=["facts"]).groupby("label", sort=False)["facts"].unique()
    return [
        f"- **{escape(label)} ran**: {'; '.join(escape(facts) for facts in choices)}"
        for label, choices in chosen.items()
    ]


def _peaks(environment: dict[str, Any]) -> list[str]:
    peaks = environment.get("matmul_peak_tflops") or {}
    if not peaks:
        return []
    measured = ", ".join(f"{dtype} {value:,.0f} TFLOP/s" for dtype, value in peaks.items())
    return [f"- **matmul peak** (8192³, measured at the start): {measured}"]


def _resumptions(meta: dict[str, Any]) -> list[str]:
    lines = []
    for resumed in meta.get("resumed") or []:
        how = " (re-running failed cells)" if resumed["retry_failed"] else ""
        mended = "; a record cut off by the stop was dropped" if resumed["dropped_partial_record"] else ""
        lines.append(f"**Resumed**: {stamp_date({'date_utc': resumed['date_utc']})}{how}{mended}  ")
    return lines


def _recorded(meta: dict[str, Any], cell_ids: pd.Series, name: str) -> str:
    planned = {cell["cell_id"] for cell in meta["planned"]}
    listed = int(cell_ids.isin(planned).sum())
    cells = f"{listed} of {len(planned)} planned"
    if "searches" not in meta:
        return f"**Cells**: {cells} recorded in `{escape(name)}`  "
    # How many probes a search takes is known only once it ends.
    searches = counted(len(meta["searches"]), "search", "searches")
    probes = f"{len(cell_ids) - listed} recorded in `{escape(name)}` for {searches}"
    return f"**Cells**: {cells}; **probes**: {probes}  " if planned else f"**Probes**: {probes}  "


def _memory_cap(meta: dict[str, Any]) -> list[str]:
    """The cap on each process's CUDA caching allocator, where the config set one."""
    cap = meta.get("memory_cap")
    return [f"**Memory cap**: {escape(cap['note'])}  "] if cap else []


def _noise_rule(timing: dict[str, Any]) -> str:
    if "noise_target" not in timing:  # runs from before noise-driven sampling
        return ""
    return f"; more while IQR / median > {timing['noise_target']:.0%}, up to {timing['max_ms']:g} ms of samples"


def _sample_span(timing: dict[str, Any]) -> str:
    if not timing.get("sample_ms"):  # one call per sample, as in runs from before grouped samples
        return ""
    return f"; a sample is the mean of calls lasting at least {timing['sample_ms']:g} ms"


def _parameters(meta: dict[str, Any]) -> list[str]:
    config, environment = meta["config"], meta["environment"]
    timing = config["timing"]
    labels = [escape(label_of(i)) for i in config["implementations"]]
    lines = [f"- **implementations**: {', '.join(labels)}"]
    searched = config.get("longest")
    if searched:
        limit = f", at most {searched['max']:,}" if searched["max"] else ""
        limited = [axis for axis in ("passes", "causal") if searched.get(axis)]
        scope = "; ".join(f"{axis}: {', '.join(map(str, searched[axis])).lower()}" for axis in limited)
        only = f" (only {scope})" if scope else ""
        lines.append(
            f"- **longest**: doubling from {searched['start']:,}, then bisection to {searched['granularity']:,}"
            f"{limit}{only}"
        )
    for axis in (
        *(("seq_lens",) if config["seq_lens"] else ()),
        "ring_sizes",
        "world_sizes",
        "batch_sizes",
        "heads",
        "head_dims",
        "dtypes",
        "causal",
        "passes",
    ):
        lines.append(f"- **{axis}**: {_values(config.get(axis, [1]))}")  # runs older than an axis ran at 1
    lines += [
        f"- **device**: {environment['device']} (config: {config['device']})",
        f"- **timing**: warm-up {timing['warmup_ms']:g} ms, repetitions {timing['rep_ms']:g} ms, "
        f"clamped to {timing['min_reps']}–{timing['max_reps']}{_noise_rule(timing)}{_sample_span(timing)}",
        f"- **seed**: {config['seed']}{' (cells shuffled within each shape)' if config.get('shuffle') else ''}",
        f"- **config**: `{escape(meta['config_source'])}` (hash {meta['config_hash']})",
    ]
    return lines


def _load(load: dict[str, Any]) -> str:
    busy = (
        ", ".join(
            f"{escape(p['name'])} (pid {p['pid']}, {p['cpu_percent']:g}% of a core)" for p in load["busy_processes"]
        )
        or "no other process busy"
    )
    return f"load average {' / '.join(f'{value:g}' for value in load['load_average'])}, {busy}"


def _host(environment: dict[str, Any]) -> list[str]:
    """The intra-op thread count and how busy the host was, where the run recorded them."""
    if "threads" not in environment:  # runs from before they were recorded
        return []
    lines = [f"- **threads**: {environment['threads']} intra-op (physical cores: {environment['physical_cores']})"]
    end = environment.get("host_load_end")
    lines.append(
        f"- **host load** at the start: {_load(environment['host_load'])}"
        + (f"; at the end: {_load(end)}" if end else "")
    )
    return lines


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _gpu_state(state: dict[str, Any]) -> str:
    return (
        f"SM {state.get('clocks.sm')} MHz, memory {state.get('clocks.mem')} MHz, {state.get('power.draw')} W "
        f"of {state.get('power.limit')}, {state.get('temperature.gpu')} °C, "
        f"clocks held back by: {throttle_reasons(state.get('clocks_throttle_reasons.active'))}"
    )


def _environment(environment: dict[str, Any]) -> list[str]:
    """Where the numbers were measured, beyond the stamp: software, and the GPUs' state at start and end."""
    libraries = ", ".join(
        f"{name} {environment[key]}"
        for name, key in (("CUDA", "cuda"), ("cuDNN", "cudnn"), ("NCCL", "nccl"))
        if environment.get(key)
    )
    lines = [
        f"- **software**: torch {escape(environment['torch'])}{f' ({libraries})' if libraries else ''}, "
        f"Python {escape(environment['python'])}, {escape(environment.get('platform', 'unknown platform'))}",
        f"- **CPU**: {escape(environment.get('cpu'))} ({environment.get('cpu_count')} cores)",
        *_host(environment),
        *_peaks(environment),
    ]
    ends = {state["index"]: state for state in environment.get("gpu_state_end") or []}
    for state in environment.get("gpu_state") or []:
        end = ends.get(state["index"])
        lines.append(
            f"- **GPU {escape(state['index'])}** at the start: {escape(_gpu_state(state))}"
            + (f"; at the end: {escape(_gpu_state(end))}" if end else "")
        )
    settings = environment.get("library_settings")
    if settings:
        lines.append(
            "- **library settings** from the environment: "
            + ", ".join(f"{escape(name)}={escape(value)}" for name, value in settings.items())
        )
    topology = environment.get("topology")
    if topology:
        matrix = _ANSI.sub("", topology).replace("`", "'").split("\n\n")[0]
        lines += ["- **GPU links** (`nvidia-smi topo -m`):", "", "```", matrix, "```"]
    return lines


def _results(frame: pd.DataFrame, level: int, baseline: str | None) -> list[str]:
    groups = list(frame.groupby(SHAPE, sort=False))
    lines = []
    for key, group in groups:
        if len(groups) > 1:
            lines += [_heading(level + 1, shape_title(key)), ""]
        for metric in METRICS:
            title = metric.title.format(baseline=escape(baseline))
            if metric.shown(group):
                lines += [f"**{title}**", "", metric_table(group, metric), ""]
            elif metric.absent:
                lines += [f"**{title}**: {metric.absent}", ""]
        allowed = tolerances(group)
        if allowed:
            lines += [allowed, ""]
        failed = failures(group)
        if failed:
            lines += ["**Failed cells**", "", failed, ""]
    return lines


# Axes a left-out cell may differ in from another, as the excluded table's columns name them.
_EXCLUDED_AXES = {
    "seq_len": "seq_len",
    "dtype": "dtype",
    "causal": "causal",
    "pass": "pass",
    "batch_size": "B",
    "heads": "H",
    "head_dim": "D",
}


def _excluded(excluded: list[dict[str, Any]]) -> str:
    """The cells the plan left out: the implementation, where it would have run, the axes in which
    the rows differ (so that no two rows read alike), and why."""
    rows = pd.DataFrame(
        [
            {
                "implementation": escape(label_of(e)),
                "run as": str(placement(e["ring_size"], e.get("world_size", 1))),
                **{name: _values([e[axis]]) for axis, name in _EXCLUDED_AXES.items()},
                "reason": escape(e["reason"]),
            }
            for e in excluded
        ]
    )
    varying = [name for name in _EXCLUDED_AXES.values() if rows[name].nunique() > 1]
    return table(rows[["implementation", "run as", *varying, "reason"]])


def _findings(
    frame: pd.DataFrame,
    label: str | None,
    level: int,
    environments: list[dict[str, Any]],
    searched: list[longest.Found],
    calibration: dict[int, dict[str, Any]],
) -> list[str]:
    """What the cells show, and what a reader should distrust, in bullet points."""
    lines = [_heading(level, "Findings"), ""]
    if frame.empty:
        lines += ["No cell has finished yet.", ""]
    else:
        assert label is not None, "a frame with cells resolves a baseline label"
        lines += [
            *summary(frame, label),
            *longest.findings(searched),
            *efficiency_findings(frame),
            *scaling.findings(frame, calibration),
            "",
        ]
    cautions = warnings(frame, environments)
    if cautions:
        lines += [_heading(level, "What to distrust"), "", *cautions, ""]
    return lines


def render_findings(run: Run, baseline: str | None = None) -> str:
    """A run's findings alone, under a heading naming the run."""
    label = resolve(run.frame, baseline)
    heading = _heading(2, f"Findings of `{escape(run.path.name)}` ({escape(run.meta['config']['name'])})")
    searched = _searched(run.frame, run.meta.get("searches", []))
    lines = _findings(with_ratios(run.frame, label), label, 3, [run.meta["environment"]], searched, run.calibration)
    return "\n".join([heading, "", *lines[2:]])


def _searched(frame: pd.DataFrame, searches: list[dict[str, Any]]) -> list[longest.Found]:
    return longest.found(frame, searches, set(frame.loc[frame[PEER], "implementation"]))


def _analysis(
    frame: pd.DataFrame,
    level: int,
    plots_dir: Path | None,
    prefix: str,
    baseline: str | None,
    excluded: list[dict[str, Any]],
    environments: list[dict[str, Any]],
    searches: list[dict[str, Any]],
    calibration: dict[int, dict[str, Any]],
) -> list[str]:
    """Everything below the stamp: findings and what to distrust first, then the longest-sequence
    searches, the cells' tables, the scaling model where the machine was calibrated, figures and
    what was left out."""
    label = resolve(frame, baseline)
    frame = with_ratios(frame, label)
    searched = _searched(frame, searches)
    lines = _findings(frame, label, level, environments, searched, calibration)
    if searched:
        lines += [
            _heading(level, "Longest sequence"),
            "",
            "The longest `seq_len` that ran (status ok), the shortest above it that did not and how, the "
            "probes it took, and the memory model's longest: the longest whose inputs per process (with "
            "the output gradient where there is a backward), what setup keeps beside them and the "
            "modelled peak of a call fit in the memory cap or the device (— where no model covers it).",
            "",
            *longest.tables(searched),
        ]
    if not frame.empty:
        lines += [_heading(level, "Results"), "", *_results(frame, level, label)]
    efficiency = ring_efficiency(frame)
    if not efficiency.empty:
        lines += [
            _heading(level, "Efficiency across processes"),
            "",
            "TFLOP/s per device, and in brackets the efficiency: that rate over single-device "
            f"`{escape(peer_name(frame))}` with the same kernel at the same total sequence length "
            "(or the longest it ran, as named).",
            "",
            table(efficiency),
            "",
        ]
    lines += scaling.lines(frame, calibration, level)
    if plots_dir is not None and not frame.empty:
        linked = plots.save(plots.figures(frame, calibration), plots_dir, prefix)
        if linked:
            lines += [_heading(level, "Plots"), "", *(f"![{name}]({file_name})" for name, file_name in linked), ""]
    if excluded:
        lines += [_heading(level, "Left out of the plan"), "", _excluded(excluded), ""]
    return lines


def render_run(
    run: Run, level: int = 1, plots_dir: Path | None = None, prefix: str = "", baseline: str | None = None
) -> str:
    meta, frame = run.meta, run.frame
    environment = meta["environment"]
    lines = [
        _heading(level, f"ringbench: {escape(meta['config']['name'])}"),
        "",
        f"**Date**: {stamp_date(environment)}  ",
        f"**Git Commit**: {stamp_commit(environment['git'])} (the repository holding the config)  ",
        *_ringbench_line(environment),
        f"**Hardware**: {_hardware(meta)}  ",
        _recorded(meta, frame["cell_id"], run.path.name),
        *_memory_cap(meta),
        *_resumptions(meta),
        "",
    ]
    if meta["config"]["description"]:
        lines += [escape(meta["config"]["description"]), ""]
    lines += _analysis(
        frame,
        level + 1,
        plots_dir,
        prefix,
        baseline,
        meta["excluded"],
        [environment],
        meta.get("searches", []),
        run.calibration,
    )
    lines += [_heading(level + 1, "Parameters"), "", *_parameters(meta), *_resolved(frame), ""]
    lines += [_heading(level + 1, "Environment"), "", *_environment(environment), ""]
    return "\n".join(lines)


def render_merged(runs: list[Run], plots_dir: Path | None = None, baseline: str | None = None) -> str:
    """Several runs as one report: cells matched by id, the newest run's record winning."""
    frame = pd.concat([run.frame.assign(run=run.path.name) for run in runs], ignore_index=True)
    frame = frame.drop_duplicates("cell_id", keep="last").reset_index(drop=True)
    taken = frame["run"].value_counts()
    sources = pd.DataFrame(
        [
            {
                "run": f"`{escape(run.path.name)}`",
                "config": escape(run.meta["config"]["name"]),
                "date": stamp_date(run.meta["environment"]),
                "commit": stamp_commit(run.meta["environment"]["git"]),
                "hardware": _hardware(run.meta),
                "cells shown": str(taken.get(run.path.name, 0)),
            }
            for run in runs
        ]
    )
    excluded = list({e["cell_id"]: e for run in runs for e in run.meta["excluded"]}.values())
    searches = list({s["search_id"]: s for run in runs for s in run.meta.get("searches", [])}.values())
    lines = [
        _heading(1, f"ringbench report: {len(runs)} runs merged"),
        "",
        f"Cells are matched by id across the runs below, oldest first; where several runs hold a cell, "
        f"the newest run's record is the one shown. {len(frame)} cells in all.",
        "",
        table(sources),
        "",
    ]
    lines += _analysis(
        frame.drop(columns="run"),
        2,
        plots_dir,
        "",
        baseline,
        excluded,
        [run.meta["environment"] for run in runs],
        searches,
        {size: entry for run in runs for size, entry in run.calibration.items()},  # the newest run's wins
    )
    return "\n".join(lines) + "\n"


def render_table(runs: list[Run], output_format: str) -> str:
    """Every run's cells as one flat table (the report's data, one row per cell), as CSV or JSON."""
    frame = pd.concat([run.frame.assign(run=run.path.name) for run in runs], ignore_index=True)
    frame = frame[["run", *[column for column in frame.columns if column != "run"]]]
    if output_format == "csv":
        return frame.to_csv(index=False)
    return frame.to_json(orient="records", indent=2) + "\n"


def render_report(runs: list[Run], plots_dir: Path | None = None, baseline: str | None = None) -> str:
    """One run renders on its own; several render as one section each, oldest first.

    With ``plots_dir`` the figures are written there as PNG and linked. ``baseline``
    names the implementation speed-ups and memory ratios are taken against (by
    default, see ``baseline.resolve``).
    """
    if len(runs) == 1:
        return render_run(runs[0], plots_dir=plots_dir, baseline=baseline) + "\n"
    sections = [
        render_run(run, level=2, plots_dir=plots_dir, prefix=f"{run.path.name}-", baseline=baseline) for run in runs
    ]
    return "\n".join([_heading(1, f"ringbench report: {len(runs)} runs"), "", *sections]) + "\n"
