"""The plan: a sweep's cartesian product as Cells with stable ids, plus what was left out and why."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from ringbench.sweep.config import Sweep
    from ringbench.attention.registry import Implementation


def implementation_label(name: str, options: Mapping[str, Any]) -> str:
    """``sdpa(backend=flash)``: an implementation with all its options, as records from before
    labels (see ``config.ImplementationChoice``) are named in tables."""
    if not options:
        return name
    return f"{name}({', '.join(f'{k}={_option_text(v)}' for k, v in sorted(options.items()))})"


def label_of(entry: Mapping[str, Any]) -> str:
    """The label a stored record, exclusion or config entry carries (``implementation`` or ``name``,
    ``options``, ``label``); the full form for those stored before labels."""
    return entry.get("label") or implementation_label(entry.get("implementation") or entry["name"],
                                                      dict(entry.get("options") or {}))


def _option_text(value: Any) -> str:
    """Options as the YAML spells them: true/false, [1, 2]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return f"[{', '.join(str(item) for item in value)}]"
    return str(value)


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

    @property
    def id(self) -> str:
        """12 hex digits of sha256 over the canonical parameters: equal on every machine and run."""
        canonical = json.dumps(self.params(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def title(self) -> str:
        """The cell on one line, as ``plan`` and the progress bar show it."""
        ring = f" ring={self.ring_size}" if self.ring_size is not None else ""
        ring += f" ranks={self.world_size}" if self.world_size > 1 else ""
        causal = " causal" if self.causal else ""
        return (
            f"{self.label or implementation_label(self.implementation, dict(self.options))} S={self.seq_len}{ring} "
            f"B={self.batch_size} H={self.heads} D={self.head_dim} {self.dtype}{causal} {self.pass_name}"
        )


@dataclass(frozen=True)
class Exclusion:
    """A combination the plan leaves out, with the reason (shown by `plan` and by the report)."""

    cell: Cell
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"cell_id": self.cell.id, **self.cell.params(), "label": self.cell.label, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    cells: tuple[Cell, ...]
    excluded: tuple[Exclusion, ...]


def _exclusion_reason(cell: Cell, implementation: "Implementation") -> str | None:
    if cell.pass_name not in implementation.passes:
        return f"{cell.implementation} supports only {', '.join(implementation.passes)}"
    if cell.ring_size is not None and cell.seq_len % cell.ring_size:
        return f"seq_len {cell.seq_len} is not divisible by ring_size {cell.ring_size}"
    return implementation.excludes(cell) if implementation.excludes else None


def _placements(sweep: "Sweep", implementation: "Implementation") -> list[tuple[int | None, int]]:
    """(ring_size, world_size) pairs an implementation runs at.

    In one process every ring size is simulated on one device; across processes
    each rank holds one shard. Implementations that cannot run distributed run
    once, in one process, as the baseline for every world size.
    """
    single = [(ring, 1) for ring in (sweep.ring_sizes if implementation.uses_ring else (None,))]
    if not implementation.distributed:
        return single
    placements = single if 1 in sweep.world_sizes else []
    return placements + [(world, world) for world in sweep.world_sizes if world > 1]


def build(sweep: "Sweep", lookup: Callable[[str], "Implementation"]) -> Plan:
    """Expand a sweep into cells, shape axes outermost so one shape's cells run together
    (in a seeded random order within the shape when the sweep asks for ``shuffle``).

    ``lookup`` finds an implementation by name: whether it takes one cell per ring
    size, and which cells it cannot run.
    """
    cells, excluded = [], []
    shapes = itertools.product(
        sweep.passes, sweep.dtypes, sweep.causal, sweep.batch_sizes, sweep.heads, sweep.head_dims, sweep.seq_lens
    )
    for shape in shapes:
        pass_name, dtype, causal, batch, heads, head_dim, seq_len = shape
        shape_cells = []
        for choice in sweep.implementations:
            implementation = lookup(choice.name)
            for ring_size, world_size in _placements(sweep, implementation):
                cell = Cell(choice.name, choice.options, seq_len, ring_size, batch, heads, head_dim, dtype, causal,
                            pass_name, world_size, choice.label)
                reason = _exclusion_reason(cell, implementation)
                if reason:
                    excluded.append(Exclusion(cell, reason))
                else:
                    shape_cells.append(cell)
        if sweep.shuffle:
            # A fixed order within a shape would let clock or thermal drift favour whoever runs
            # first; the shuffle is seeded by the sweep's seed and the shape, so it repeats exactly.
            random.Random(f"{sweep.seed}:{shape}").shuffle(shape_cells)
        cells.extend(shape_cells)
    return Plan(tuple(cells), tuple(excluded))
