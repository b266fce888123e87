"""The plan: a sweep's cartesian product as Cells with stable ids (or, for a config with ``longest``,
as longest-sequence Searches), plus what was left out and why."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ringbench.attention.registry import Implementation, Registry
from ringbench.sweep import config
from ringbench.sweep.config import Sweep
from ringbench.sweep.longest import Search
from ringbench.vocabulary import ROLES, Cell


@dataclass(frozen=True)
class Exclusion:
    """A combination the plan leaves out, with the reason (shown by `plan` and by the report)."""

    cell: Cell
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"cell_id": self.cell.id, **self.cell.params(), "label": self.cell.label, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """The cells to run and the searches (whose probes are cells), those left out, and the
    implementations that run them, by name."""

    cells: tuple[Cell, ...]
    excluded: tuple[Exclusion, ...]
    implementations: Mapping[str, Implementation] = field(default_factory=dict, compare=False)
    searches: tuple[Search, ...] = ()

    def pending(self, done: set[str]) -> Plan:
        """The plan less the cells whose ids are in ``done``."""
        return replace(self, cells=tuple(cell for cell in self.cells if cell.id not in done))

    def roles(self) -> dict[str, list[str]]:
        """For each role an implementation may declare (``vocabulary.ROLES``), the planned implementations
        declaring it, in the sweep's order: what a run stores for the report."""
        return {role: [name for name, impl in self.implementations.items() if role in impl.roles] for role in ROLES}


def exclusion_reason(cell: Cell, implementation: Implementation) -> str | None:
    """Why ``implementation`` cannot run ``cell``, or None."""
    if cell.pass_name not in implementation.passes:
        return f"{cell.implementation} supports only {', '.join(implementation.passes)}"
    if cell.ring_size is not None and cell.seq_len % cell.ring_size:
        return f"seq_len {cell.seq_len} is not divisible by ring_size {cell.ring_size}"
    return implementation.excludes(cell) if implementation.excludes else None


def _placements(sweep: Sweep, implementation: Implementation) -> list[tuple[int | None, int]]:
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


def _expand(
    sweep: Sweep,
    lookup: Callable[[str], Implementation],
    seq_lens: tuple[int, ...],
    passes: tuple[str, ...],
    causal: tuple[bool, ...],
    granule: int | None,
) -> tuple[list[Cell], list[Exclusion]]:
    """The cells of ``sweep`` at ``seq_lens`` for ``passes`` and ``causal``, shape axes outermost, and
    those left out; with ``granule``, a cell is left out also where a probe of that length would be."""
    cells, excluded = [], []
    shapes = itertools.product(passes, sweep.dtypes, causal, sweep.batch_sizes, sweep.heads, sweep.head_dims, seq_lens)
    for shape in shapes:
        pass_name, dtype, is_causal, batch, heads, head_dim, seq_len = shape
        shape_cells = []
        for choice in sweep.implementations:
            implementation = lookup(choice.name)
            for ring_size, world_size in _placements(sweep, implementation):
                cell = Cell(
                    choice.name,
                    choice.options,
                    seq_len,
                    ring_size,
                    batch,
                    heads,
                    head_dim,
                    dtype,
                    is_causal,
                    pass_name,
                    world_size,
                    choice.label,
                )
                tried = [cell, replace(cell, seq_len=granule)] if granule else [cell]
                reason = next(
                    ((probe, why) for probe in tried if (why := exclusion_reason(probe, implementation))), None
                )
                if reason:
                    excluded.append(Exclusion(*reason))
                else:
                    shape_cells.append(cell)
        if sweep.shuffle:
            # A fixed order within a shape would let clock or thermal drift favour whoever runs
            # first; the shuffle is seeded by the sweep's seed and the shape, so it repeats exactly.
            random.Random(f"{sweep.seed}:{shape}").shuffle(shape_cells)
        cells.extend(shape_cells)
    return cells, excluded


def build(sweep: Sweep, lookup: Callable[[str], Implementation]) -> Plan:
    """Expand a sweep into cells, shape axes outermost so one shape's cells run together
    (in a seeded random order within the shape when the sweep asks for ``shuffle``).

    With ``longest``, each cell of the passes and causal settings it searches, at the search's
    start, is also a search (beside the cells of ``seq_lens``, where the sweep lists any). A search
    is left out where its implementation cannot run its first probe or a single granule (every
    probe is a multiple of one, so a divisibility the implementation needs holds for all probes
    once it holds for the granule).

    ``lookup`` finds an implementation by name: whether it takes one cell per ring
    size, and which cells it cannot run.
    """
    cells, excluded = _expand(sweep, lookup, sweep.seq_lens, sweep.passes, sweep.causal, None)
    implementations = {choice.name: lookup(choice.name) for choice in sweep.implementations}
    searches: tuple[Search, ...] = ()
    if sweep.longest:
        spec = sweep.longest
        firsts, left_out = _expand(
            sweep, lookup, (spec.start,), spec.passes or sweep.passes, spec.causal or sweep.causal, spec.granularity
        )
        searches = tuple(Search(cell, spec) for cell in firsts)
        listed = {exclusion.cell.id for exclusion in excluded}
        excluded += [exclusion for exclusion in left_out if exclusion.cell.id not in listed]
    return Plan(tuple(cells), tuple(excluded), implementations, searches)


def load(path: str | Path) -> tuple[Sweep, Plan]:
    """A sweep config read and expanded into its plan, its implementations looked up in a registry
    of its own: the bundled ones and those its plugins bring."""
    registry = Registry.bundled()
    sweep = config.load(path, registry)
    return sweep, build(sweep, registry.get)
