"""Predictions made before a run: the scaling model (``report.model``) applied to the cells a
sweep plans, from runs measured earlier (their single-GPU cells and their links' calibration).

``ringbench predict`` makes them and writes them to a file; ``ringbench run --predictions`` keeps
that file in the new run's folder (``records.PREDICTIONS_FILE``), and the run's report sets each
prediction beside what was measured, saying when, and from which runs, it was made. A world size
the earlier runs did not calibrate is predicted on the links of the nearest one they did.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from ringbench import records
from ringbench.errors import UserError
from ringbench.report import model, scaling
from ringbench.report.load import Run
from ringbench.report.markdown import escape, table
from ringbench.vocabulary import DTYPE_BYTES, Cell, counted, implementation_label

COVERED = "the model covers ring (zigzag where causal), ulysses and usp"


def _reasons(left_out: list[dict[str, str]]) -> list[str]:
    """Each reason cells were left out for, once, with how many."""
    return [f"{reason} ({count}×)" for reason, count in Counter(entry["reason"] for entry in left_out).items()]


def _devices(sources: Sequence[Run]) -> set[str]:
    return {gpu["name"] for run in sources for gpu in run.meta["environment"].get("gpus") or [{"name": "cpu"}]}


def _kernel(cell: Cell, options: dict[str, Any], recorded: pd.DataFrame) -> str | None:
    """The kernel the cell will run: as its options name it; for ``auto``, the one the runs' cells of
    the same implementation, options (those recorded: an option added since is not), pass, dtype
    and head_dim ran, where they agree on one."""
    named = model.planned_kernel(options)
    if named is not None:
        return named
    like = _alike(cell, options, recorded)
    like = like[(like["pass"] == cell.pass_name) & (like["head_dim"] == cell.head_dim) & (like["status"] == records.OK)]
    ran = set(like["kernel"].dropna())
    return ran.pop() if len(ran) == 1 else None


def _alike(cell: Cell, options: dict[str, Any], recorded: pd.DataFrame) -> pd.DataFrame:
    """The runs' cells of ``cell``'s implementation and dtype whose options are ``options`` (those
    recorded: an option added since is not)."""
    return recorded[
        (recorded["implementation"] == cell.implementation)
        & recorded["options"].map(lambda text: json.loads(text).items() <= options.items())
        & (recorded["dtype"] == cell.dtype)
    ]


def _predict(
    cell: Cell,
    recorded: pd.DataFrame,
    blocks: dict[tuple, model.Blocks],
    calibration: dict[int, dict[str, Any]],
    gpus_per_node: int,
    inter_node_gbit_s: float,
) -> dict[str, Any] | str:
    """The cell's prediction as the file stores it, or why there is none."""
    options = dict(cell.options)
    degree = model.cell_degree(cell.implementation, options, cell.world_size, cell.causal)
    if degree is None:
        return COVERED
    kernel = _kernel(cell, options, recorded)
    if kernel is None:
        return "its kernel is chosen when it runs (auto), and no cell of the runs like it says which"
    key = (kernel, cell.dtype, cell.batch_size, cell.heads, cell.head_dim)
    if key not in blocks:
        return (
            f"the runs have no single-GPU cells of the peer with kernel {kernel}, {cell.dtype} "
            f"B={cell.batch_size} H={cell.heads} D={cell.head_dim}"
        )
    entry = model.calibration_for(calibration, cell.world_size)
    copy_engine = model.plans_copy_engine(options, entry)
    if not model.transfers_calibrated(entry, copy_engine):
        return "the runs' calibration measured no copy-engine transfers"
    machine = model.Machine.from_calibration(entry, inter_node_gbit_s, gpus_per_node, copy_engine)
    shape = model.Shape(cell.batch_size, cell.heads, cell.head_dim, DTYPE_BYTES[cell.dtype])
    own_rows_first = model.attends_own_rows_first(cell.implementation, options, cell.world_size, cell.causal)
    found = model.predict(
        degree, cell.world_size, cell.seq_len, cell.causal, cell.pass_name, shape, blocks[key], machine, own_rows_first
    )
    if found is None:
        return "the runs lack the peer's passes it needs (forward, beside forward+backward for a backward)"
    # A call the host took longer to launch, when an earlier run measured the same cell, than the
    # modelled GPU time runs at the host's pace, as the report models a cell from its own launch.
    launch_ms = _launch_ms(cell, options, recorded)
    host_paced = launch_ms is not None and launch_ms > found.ms
    ms = max(found.ms, launch_ms or 0.0)
    return {
        "title": cell.title,
        "label": cell.label or implementation_label(cell.implementation, options),
        "world_size": cell.world_size,
        "seq_len": cell.seq_len,
        "pass": cell.pass_name,
        "causal": cell.causal,
        "ms": ms,
        "efficiency": found.efficiency * found.ms / ms,
        "exposed": found.exposed,
        "extrapolated": found.extrapolated,
        "host_paced": host_paced,
    }


def _launch_ms(cell: Cell, options: dict[str, Any], recorded: pd.DataFrame) -> float | None:
    """The host's time to launch one call of ``cell``, as the newest of the runs that measured the same
    cell (:func:`_alike`, at every parameter of the cell) found it; None where none did."""
    alike = _alike(cell, options, recorded)
    same = alike[
        (alike["world_size"] == cell.world_size)
        & (alike["seq_len"] == cell.seq_len)
        & (alike["pass"] == cell.pass_name)
        & (alike["causal"] == cell.causal)
        & (alike["batch_size"] == cell.batch_size)
        & (alike["heads"] == cell.heads)
        & (alike["head_dim"] == cell.head_dim)
        & alike["launch_ms"].notna()
    ]
    return None if same.empty else float(same["launch_ms"].iloc[-1])


def make(
    cells: Sequence[Cell],
    sources: Sequence[Run],
    config_source: str,
    gpus_per_node: int = model.GPUS_PER_NODE,
    inter_node_gbit_s: float = model.INTER_NODE_GBIT_S,
) -> dict[str, Any]:
    """The predictions file for ``cells`` (the multi-process ones; one process is the peer's), from
    ``sources``: runs of one device, at least one of which calibrated its links."""
    names = ", ".join(str(run.path) for run in sources)
    devices = _devices(sources)
    if len(devices) > 1:
        raise UserError(f"{names}: measured on different devices ({', '.join(sorted(devices))}); predict from one")
    # The newest run's calibration of a world size wins, as in a merged report.
    ordered = sorted(sources, key=lambda run: run.path.name)
    calibration = {size: entry for run in ordered for size, entry in run.calibration.items()}
    if not calibration:
        raise UserError(f"{names}: no calibration.json; a run of several processes on a GPU measures its links")
    recorded = pd.concat([run.frame for run in ordered], ignore_index=True)
    blocks = model.blocks_of(recorded)
    predicted, left_out = {}, []
    for cell in cells:
        if cell.world_size == 1:
            continue
        found = _predict(cell, recorded, blocks, calibration, gpus_per_node, inter_node_gbit_s)
        if isinstance(found, str):
            left_out.append({"title": cell.title, "reason": found})
        else:
            predicted[cell.id] = found
    if not predicted:
        why = "; ".join(_reasons(left_out)) or "it plans none across processes"
        raise UserError(f"{config_source}: no cell to predict: {why}")
    return {
        "schema_version": records.PREDICTIONS_VERSION,
        "made_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config_source,
        "sources": [run.path.name for run in ordered],
        "device": devices.pop(),
        "calibrated_world_sizes": sorted(calibration),
        "gpus_per_node": gpus_per_node,
        "inter_node_gbit_s": inter_node_gbit_s,
        "cells": predicted,
        "left_out": left_out,
    }


def render(payload: dict[str, Any]) -> str:
    """The predictions as ``ringbench predict`` prints them: a table, then what was left out and why."""
    lines = [
        f"Predicted for {escape(payload['config'])} from {', '.join(payload['sources'])} "
        f"({escape(payload['device'])}; links calibrated at {', '.join(map(str, payload['calibrated_world_sizes']))} "
        f"processes; nodes of {payload['gpus_per_node']} GPUs joined at {payload['inter_node_gbit_s']:,.0f} Gb/s "
        f"per GPU): {counted(len(payload['cells']), 'cell')}.",
        "",
    ]
    rows = [
        {
            "implementation": escape(predicted["label"]),
            "processes": str(predicted["world_size"]),
            "seq_len": str(predicted["seq_len"]),
            "pass": predicted["pass"],
            "causal": "yes" if predicted["causal"] else "no",
            "ms": f"{predicted['ms']:,.2f}",
            "per-GPU efficiency": f"{predicted['efficiency']:.3f}"
            + (scaling.EXPOSED if predicted["exposed"] else "")
            + (scaling.EXTRAPOLATED if predicted["extrapolated"] else "")
            + (scaling.HOST_BOUND if predicted.get("host_paced") else ""),
        }
        for predicted in payload["cells"].values()
    ]
    if rows:
        host_paced = any(predicted.get("host_paced") for predicted in payload["cells"].values())
        lines += [
            table(pd.DataFrame(rows), text_columns=5),
            "",
            f"{scaling.EXPOSED}: a transfer outlasts the block it should hide behind. {scaling.EXTRAPOLATED}: a "
            "block shorter than the peer's shortest cell, timed at that cell's rate (optimistic)."
            + (f" {scaling.HOST_BOUND}: {scaling.HOST_PACED_BEFORE}." if host_paced else ""),
            "",
        ]
    reasons = _reasons(payload["left_out"])
    if reasons:
        lines += ["Not predicted:", *(f"- {escape(reason)}" for reason in reasons), ""]
    return "\n".join(lines)
