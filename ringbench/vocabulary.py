"""The words every part of ringbench shares: dtypes, passes, the cell, and how cells are named.

This module imports nothing else from ringbench (nor torch), so that the config,
the plan, the run, the implementations and the report can all speak of cells
without importing one another.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
DTYPES = tuple(DTYPE_BYTES)
# backward is timed without its forward; forward+backward is the training step's attention.
PASSES = ("forward", "backward", "forward+backward")
# Roles an implementation may declare at registration, which the report looks for among a run's
# implementations: the dense baseline that speed-ups and memory savings are taken against (where
# none ran, the peer stands in), and the single-device peer that the per-device efficiency of runs
# across processes is set against.
BASELINE, PEER = "baseline", "peer"
ROLES = (BASELINE, PEER)

GPU_IDLE = 0x1  # the one clock-event reason that only says nothing was running
# What holds a GPU's clocks below their top: the bits of NVML's clock-event reasons (nvidia-smi's
# clocks_throttle_reasons), named as NVML names them.
CLOCK_REASONS = {
    0x1: "idle",
    0x2: "application clocks setting",
    0x4: "software power cap",
    0x8: "hardware slowdown",
    0x10: "sync boost",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
    0x100: "display clock setting",
}


def clock_reasons(mask: int) -> list[str]:
    """The reasons a clock-event mask names, in words; bits NVML has not named as ``other (0x…)``."""
    named = [name for bit, name in CLOCK_REASONS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_REASONS)
    return named + ([f"other ({unknown:#x})"] if unknown else [])


def compact(value: Any) -> str:
    """Option values as labels show them: 1K for 1024, 1M for 1048576, lists joined by commas."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
            if value >= size and value % size == 0:
                return f"{value // size}{unit}"
        return str(value)
    if isinstance(value, (tuple, list)):
        return ",".join(compact(item) for item in value)
    return str(value)


def counted(count: int, noun: str, plural: str = "") -> str:
    """``count`` and the noun in number: 1 search, 4 searches."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def option_text(value: Any) -> str:
    """Options as the YAML spells them: true/false, [1, 2]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return f"[{', '.join(str(item) for item in value)}]"
    return str(value)


def implementation_label(name: str, options: Mapping[str, Any]) -> str:
    """``sdpa(backend=flash)``: an implementation with all its options, as records from before
    labels are named in tables."""
    if not options:
        return name
    return f"{name}({', '.join(f'{k}={option_text(v)}' for k, v in sorted(options.items()))})"


def label_of(entry: Mapping[str, Any]) -> str:
    """The label a stored record, exclusion or config entry carries (``implementation`` or ``name``,
    ``options``, ``label``); the full form for those stored before labels."""
    return entry.get("label") or implementation_label(
        entry.get("implementation") or entry["name"], dict(entry.get("options") or {})
    )


@dataclass(frozen=True, order=True)
class Placement:
    """Where a cell ran: on one device whole (``kind`` 0), on one device in ``count`` ring shards
    (1), or one shard on each of ``count`` processes (2). Placements sort in that order."""

    kind: int
    count: int

    def __str__(self) -> str:
        return ("no ring", f"ring {self.count}", f"{self.count} processes")[self.kind]

    @property
    def whole(self) -> bool:
        return self.kind == 0


def placement(ring_size: float | None, world_size: float | None = 1) -> Placement:
    """The placement of a cell's ring size and world size; missing values (NaN in a frame, or
    None in records from before world sizes) read as one device, no ring."""
    world = 1 if world_size is None or _missing(world_size) else int(world_size)
    if world > 1:
        return Placement(2, world)
    return Placement(0, 0) if ring_size is None or _missing(ring_size) else Placement(1, int(ring_size))


def _missing(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def series_name(label: str, where: Placement) -> str:
    """An implementation at a placement, as findings, figures and failure lists name it:
    ``ring (ring 4)``, or the label alone where it ran whole on one device."""
    return label if where.whole else f"{label} ({where})"


@dataclass(frozen=True)
class Cell:
    """One measurement: an implementation with its options at one point of every axis.

    ``ring_size`` is None for implementations that do not shard the sequence.
    ``world_size`` is the number of processes the cell runs on; above 1 each holds
    one shard, so ``ring_size`` equals it. ``label`` names the implementation with
    its options in tables; it is not part of what the cell computes, nor of its id.
    """

    implementation: str
    options: tuple[tuple[str, Any], ...]
    seq_len: int
    ring_size: int | None
    batch_size: int
    heads: int
    head_dim: int
    dtype: str
    causal: bool
    pass_name: str
    world_size: int = 1
    label: str = field(default="", compare=False)

    def params(self) -> dict[str, Any]:
        """The cell as plain JSON types, the form stored in records."""
        return {
            "implementation": self.implementation,
            "options": dict(self.options),
            "seq_len": self.seq_len,
            "ring_size": self.ring_size,
            "batch_size": self.batch_size,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "causal": self.causal,
            "pass": self.pass_name,
            "world_size": self.world_size,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any], label: str = "") -> Cell:
        """The cell ``params()`` describes."""
        return cls(
            params["implementation"],
            tuple(sorted(dict(params["options"]).items())),
            params["seq_len"],
            params["ring_size"],
            params["batch_size"],
            params["heads"],
            params["head_dim"],
            params["dtype"],
            params["causal"],
            params["pass"],
            params.get("world_size", 1),
            label,
        )

    @property
    def id(self) -> str:
        """12 hex digits of sha256 over the canonical parameters: equal on every machine and run."""
        canonical = json.dumps(self.params(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def placement(self) -> Placement:
        return placement(self.ring_size, self.world_size)

    @property
    def title(self) -> str:
        """The cell on one line, as ``plan``, the progress bar and ``compare`` name it: every axis, so
        that no two cells of a sweep read alike."""
        name = self.label or implementation_label(self.implementation, dict(self.options))
        return f"{name} {self.situation}"

    @property
    def situation(self) -> str:
        """Every axis but the implementation, as ``compare --labels`` names the cells of two
        implementations it sets side by side."""
        causal = " causal" if self.causal else ""
        return (
            f"S={self.seq_len} {self.placement} B={self.batch_size} H={self.heads} D={self.head_dim} "
            f"{self.dtype}{causal} {self.pass_name}"
        )
