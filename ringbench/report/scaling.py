"""The report's "Scaling model" section: the model (``report.model``) beside every multi-process
cell of a run it covers, on the machine the run calibrated, and projected to many GPUs and long
sequences on a stated one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ringbench.report.markdown import escape, table
from ringbench.report.model import (
    INTER_NODE_GBIT_S,
    KERNEL_SHAPE,
    Machine,
    Prediction,
    attends_own_rows_first,
    blocks_of,
    degree_of,
    predict,
    shape_of,
    strategy_name,
    transfers_calibrated,
)
from ringbench.report.summary import efficiencies

PROJECTED_GPUS = tuple(2**power for power in range(3, 11))  # 8 … 1,024
PROJECTED_TOKENS = tuple(2**power for power in range(17, 25))  # 128K … 16M
EXPOSED, EXTRAPOLATED, HOST_BOUND = "†", "‡", "§"  # marks in the report's tables
HOST_PACED_BEFORE = (
    "an earlier run of the cell found the host slower to launch the call than the modelled GPU time, so "
    "it is predicted at the host's pace"
)
HELD_TO_PERCENT = 5.0  # how close to a measured efficiency the model is held to be


def validation(frame: pd.DataFrame, calibration: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """Each multi-process cell the model covers, measured beside modelled: per-GPU efficiency against
    the single-GPU peer the efficiency table pairs it with, on the machine its world size's
    calibration measured (every rank on one host); and beside a prediction made before the run
    (``report.predictions``), where the run kept one."""
    blocks, rows = blocks_of(frame), []
    for row, peer in efficiencies(frame):
        degree, entry = degree_of(row), calibration.get(row["world_size"])
        key, copy_engine = tuple(row[KERNEL_SHAPE]), row.get("transfers") == "copy-engine"
        if degree is None or entry is None or key not in blocks or not transfers_calibrated(entry, copy_engine):
            continue
        machine = Machine.from_calibration(entry, gpus_per_node=entry["ranks_per_host"], copy_engine=copy_engine)
        own_rows_first = attends_own_rows_first(
            row["implementation"], json.loads(row["options"]), row["world_size"], row["causal"]
        )
        modelled = predict(
            degree,
            row["world_size"],
            row["seq_len"],
            row["causal"],
            row["pass"],
            shape_of(key),
            blocks[key],
            machine,
            own_rows_first,
        )
        if modelled is None:
            continue
        measured = row["tflops_per_device"] / peer["tflops_per_device"]
        modelled_ms, marks = modelled.ms, EXTRAPOLATED if modelled.extrapolated else ""
        # A call the host takes longer to launch than the modelled GPU time runs at the host's pace.
        if pd.notna(row.get("launch_ms")) and row["launch_ms"] > modelled_ms:
            modelled_ms, marks = row["launch_ms"], marks + HOST_BOUND
        efficiency = measured * row["median_ms"] / modelled_ms  # against the same peer as measured
        predicted, paced = row.get("predicted_efficiency"), row.get("predicted_host_paced")
        predicted_mark = HOST_BOUND if pd.notna(paced) and paced else ""
        rows.append(
            {
                "implementation": escape(row["label"]),
                "processes": str(row["world_size"]),
                "seq_len": str(row["seq_len"]),
                "pass": row["pass"],
                "causal": "yes" if row["causal"] else "no",
                "kernel": escape(row["kernel"]),
                "measured": f"{measured:.3f}",
                "model": f"{efficiency:.3f}{marks}",
                "error": efficiency / measured - 1,  # a fraction; the table writes it as a percentage
                "predicted before": f"{predicted:.3f}{predicted_mark}" if pd.notna(predicted) else "",
                "its error": predicted / measured - 1 if pd.notna(predicted) else math.nan,
            }
        )
    checked = pd.DataFrame(rows)
    if checked.empty or checked["its error"].isna().all():
        return checked.drop(columns=["predicted before", "its error"], errors="ignore")
    return checked


@dataclass(frozen=True)
class Projection:
    """The model on a stated machine for one kernel, shape, pass and causality: every strategy's
    prediction per (GPUs, tokens)."""

    kernel_shape: tuple
    pass_name: str
    causal: bool
    predictions: dict[tuple[int, int], dict[str, Prediction]]  # (GPUs, tokens) → strategy → prediction

    def best(self, world: int, tokens: int) -> tuple[str, Prediction] | None:
        found = self.predictions.get((world, tokens))
        return max(found.items(), key=lambda item: item[1].efficiency) if found else None


def projections(
    frame: pd.DataFrame, calibration: dict[int, dict[str, Any]], inter_node_gbit_s: float = INTER_NODE_GBIT_S
) -> tuple[Machine, list[Projection]] | None:
    """The model projected to ``PROJECTED_GPUS`` × ``PROJECTED_TOKENS`` on the machine of the largest
    calibrated world size, nodes of ``GPUS_PER_NODE`` joined at ``inter_node_gbit_s``: for each kernel
    and shape the peer ran, each pass and causality it ran."""
    if not calibration:
        return None
    machine = Machine.from_calibration(calibration[max(calibration)], inter_node_gbit_s)
    found = []
    for key, blocks in blocks_of(frame).items():
        shape = shape_of(key)
        for pass_name, causal in sorted(blocks.times):
            table: dict[tuple[int, int], dict[str, Prediction]] = {}
            for world in PROJECTED_GPUS:
                degrees = [d for d in range(1, world + 1) if world % d == 0 and shape.heads % d == 0]
                for tokens in PROJECTED_TOKENS:
                    table[world, tokens] = {
                        strategy_name(degree, world): modelled
                        for degree in degrees
                        # `ulysses` as it runs by default: its own rows first in causal attention.
                        if (
                            modelled := predict(
                                degree,
                                world,
                                tokens,
                                causal,
                                pass_name,
                                shape,
                                blocks,
                                machine,
                                causal and degree == world,
                            )
                        )
                    }
            found.append(Projection(key, pass_name, causal, table))
    return machine, found


def tokens_text(count: int) -> str:
    return f"{count // 2**20}M" if count >= 2**20 else f"{count // 2**10}K"


def _projection_table(projection: Projection) -> pd.DataFrame:
    rows = []
    for world in PROJECTED_GPUS:
        row = {"GPUs": f"{world:,}"}
        for tokens in PROJECTED_TOKENS:
            best = projection.best(world, tokens)
            if best:
                name, modelled = best
                marks = (EXPOSED if modelled.exposed else "") + (EXTRAPOLATED if modelled.extrapolated else "")
                row[tokens_text(tokens)] = f"{name} {modelled.efficiency:.2f}{marks}"
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def _exposed_from(projection: Projection) -> str:
    """Per token count, the fewest GPUs from which no strategy hides its transfers any more."""
    found = []
    for tokens in PROJECTED_TOKENS:
        worlds = [w for w in PROJECTED_GPUS if (best := projection.best(w, tokens)) and best[1].exposed]
        if worlds:
            found.append(f"{tokens_text(tokens)} from {worlds[0]:,} GPUs")
    return ", ".join(found) if found else "nowhere in this table"


def _machine_line(machine: Machine, calibrated: dict[str, Any]) -> str:
    contention = (
        f"a block kernel runs {machine.contention:+.1%} slower while ring transfers run beside it"
        if calibrated["contention"]
        else "the slowdown of a block beside transfers is not measured on the CPU (taken as none)"
    )
    return (
        f"Measured on {escape(machine.device)}, {machine.world_size} processes on one host "
        f"({escape(calibrated['measured_at'])}): a ring step's transfer {machine.ring_step.latency_ms * 1e3:,.1f} µs "
        f"+ bytes at {machine.ring_step.gb_per_s:,.1f} GB/s; an all-to-all "
        f"{machine.all_to_all.latency_ms * 1e3:,.1f} µs + bytes sent per rank at "
        f"{machine.all_to_all.gb_per_s:,.1f} GB/s; "
        f"a merge {machine.merge_ms_per_mib * 1024:,.2f} ms per GiB of float32 accumulator "
        f"({escape(calibrated['merge']['path'])}); {contention}{_copy_engine_clause(calibrated)}. Block times are "
        "the single-device peer's cells "
        "of the same kernel and shape (on a rank's heads, where it ran that many), interpolated between the "
        "lengths it ran."
    )


def _copy_engine_clause(calibrated: dict[str, Any]) -> str:
    """What the calibration measured of copy-engine transfers, where it did (as ``; …``)."""
    if not transfers_calibrated(calibrated, copy_engine=True):
        return ""
    machine = Machine.from_calibration(calibrated, copy_engine=True)
    return (
        f"; with copy-engine transfers a ring step's transfer {machine.ring_step.latency_ms * 1e3:,.1f} µs + bytes "
        f"at {machine.ring_step.gb_per_s:,.1f} GB/s, and a block kernel {machine.contention:+.1%} slower beside them"
    )


def _agreement(errors: pd.Series) -> str:
    """How many of the fractional ``errors`` (NaN: no figure) are within ``HELD_TO_PERCENT``."""
    percent = errors.dropna().abs() * 100
    within = int((percent <= HELD_TO_PERCENT).sum())
    return f"within {HELD_TO_PERCENT:g}% in {within} of {len(percent)} cells (largest error {percent.max():.1f}%)"


def _predicted(frame: pd.DataFrame, checked: pd.DataFrame) -> str | None:
    """Where the run kept predictions: when and from what they were made, and how close they came."""
    if "its error" not in checked:
        return None
    made = "; ".join(escape(text) for text in frame["prediction"].dropna().unique())
    return f"predictions ({made}) {_agreement(checked['its error'])}"


def findings(frame: pd.DataFrame, calibration: dict[int, dict[str, Any]]) -> list[str]:
    """The findings' lines on the model: how close it came to the run's multi-process cells, and
    how close the predictions the run kept came."""
    checked = validation(frame, calibration) if calibration else pd.DataFrame()
    if checked.empty:
        return []
    found = [f"- Scaling model against the multi-process cells: {_agreement(checked['error'])}, as its section shows"]
    predicted = _predicted(frame, checked)
    return found + ([f"- Its {predicted}"] if predicted else [])


def _percent(error: float) -> str:
    return "" if math.isnan(error) else f"{error:+.1%}"


def lines(
    frame: pd.DataFrame,
    calibration: dict[int, dict[str, Any]],
    level: int,
    inter_node_gbit_s: float = INTER_NODE_GBIT_S,
) -> list[str]:
    """The report's "Scaling model" section: the measured inputs, the model against every covered
    multi-process cell, and its projection; nothing where the run calibrated no world size."""
    projected = projections(frame, calibration, inter_node_gbit_s)
    if projected is None:
        return []
    machine, found = projected
    heading = "#" * level
    out = [
        f"{heading} Scaling model",
        "",
        "Per-GPU efficiency of `ring`, `ulysses` and `usp` (the Ulysses degree × the ring degree) modelled "
        'from measured parts; the equations are in the README ("Scaling model").',
        "",
        _machine_line(machine, calibration[machine.world_size]),
        "",
    ]
    checked = validation(frame, calibration)
    if checked.empty and not any(any(projection.predictions.values()) for projection in found):
        out += [
            "No cell of this run can be modelled: the model needs the peer's forward cells, beside any "
            "forward+backward ones, to time a ring step's forward and backward apart.",
            "",
        ]
    if not checked.empty:
        host_bound = checked["model"].str.contains(HOST_BOUND).any()
        host_paced_before = "predicted before" in checked and checked["predicted before"].str.contains(HOST_BOUND).any()
        predicted = _predicted(frame, checked)
        out += [
            f"{heading}# Model against measurement",
            "",
            "Per-GPU efficiency over the single-device peer (at the same length, or the longest it ran, as "
            "the efficiency table pairs them), measured and modelled, on the machine each world size "
            f"measured. {_agreement(checked['error']).capitalize()}. {EXTRAPOLATED}: a block shorter than the "
            "peer's shortest cell, timed at that cell's rate (optimistic)."
            + (
                f" {HOST_BOUND}: the host takes longer to launch the call (measured in the cell) than the "
                "modelled GPU time, so the call runs at the host's pace."
                if host_bound
                else ""
            )
            + (
                f" The {predicted}: the model then, on the machine and single-GPU cells of those runs."
                if predicted
                else ""
            )
            + (f" {HOST_BOUND} on a prediction: {HOST_PACED_BEFORE}." if host_paced_before else ""),
            "",
            table(
                checked.assign(
                    **{name: checked[name].map(_percent) for name in ("error", "its error") if name in checked}
                )
            ),
            "",
        ]
    for projection in found:
        if not any(projection.predictions.values()):
            continue
        kernel, dtype, batch_size, heads, head_dim = projection.kernel_shape
        causal = "causal" if projection.causal else "non-causal"
        out += [
            f"{heading}# Projection: {projection.pass_name}, {causal}, {escape(kernel)}, {dtype} "
            f"B={batch_size} H={heads} D={head_dim}",
            "",
            f"The best strategy and its per-GPU efficiency, in nodes of {machine.gpus_per_node} GPUs joined at "
            f"{inter_node_gbit_s:,.0f} Gb/s per GPU (stated, not measured); within a node as measured. "
            f"{EXPOSED}: a transfer outlasts the block it should hide behind (a ring step's, or `ulysses`' own "
            f"rows beside its inbound all-to-all), from which on "
            f"communication no longer hides: {_exposed_from(projection)}. {EXTRAPOLATED}: a block shorter "
            "than the peer's shortest cell, timed at that cell's rate (optimistic). Efficiency is against "
            "one GPU at the rate of the peer's longest cell beyond it.",
            "",
            table(_projection_table(projection)),
            "",
        ]
    return out
