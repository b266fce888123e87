"""The longest-sequence search: for one implementation at one placement and shape, the longest
``seq_len`` that runs, found by probes that are ordinary cells.

The search's state is nothing but the outcomes of its probes so far (by ``seq_len``: ran or
not), so whoever holds the records holds the search: a worker derives its next probe from them,
the supervisor knows which probe a worker that died was running, and a resumed run goes on where
the stopped one left off.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ringbench.attention.models import output_bytes
from ringbench.vocabulary import Cell


@dataclass(frozen=True)
class SearchSpec:
    """Doubling from ``start`` while probes run; after the first failure, bisection between the
    longest that ran and the shortest that failed, until they are at most ``granularity`` apart.
    Every probe is a multiple of ``granularity`` (the config checks that ``start`` and ``max`` are),
    and none exceeds ``max``."""

    start: int
    granularity: int
    max: int | None = None
    # Which of the sweep's passes and causal settings are searched; empty: every one. With
    # seq_lens beside the search, a sweep times its cells at every length and searches these only.
    passes: tuple[str, ...] = ()
    causal: tuple[bool, ...] = ()


def bounds(outcomes: Mapping[int, bool]) -> tuple[int | None, int | None]:
    """The longest ``seq_len`` that ran, and the shortest above it that did not (None where none).

    A failure below a length that ran (a passing fault, say) does not bound the search."""
    longest = max((seq_len for seq_len, ran in outcomes.items() if ran), default=None)
    failed = [seq_len for seq_len, ran in outcomes.items() if not ran and (longest is None or seq_len > longest)]
    return longest, min(failed, default=None)


def next_probe(spec: SearchSpec, outcomes: Mapping[int, bool]) -> int | None:
    """The ``seq_len`` to probe next given the outcomes so far, or None once the search is over."""
    if not outcomes:
        return spec.start
    longest, failed = bounds(outcomes)
    step = spec.granularity
    if failed is None:  # everything ran: double, up to the bound
        assert longest is not None, "outcomes without a failure hold a length that ran"
        if spec.max is not None and longest >= spec.max:
            return None
        return longest * 2 if spec.max is None else min(longest * 2, spec.max)
    floor = longest or 0  # nothing ran yet: bisect down toward a single granule
    if failed - floor <= step:
        return None
    return floor + (failed - floor) // step // 2 * step


def run_search(spec: SearchSpec, runs: Callable[[int], bool]) -> dict[int, bool]:
    """Every outcome of a search whose probes ``runs`` decides: what a model predicts, for one."""
    outcomes: dict[int, bool] = {}
    while (seq_len := next_probe(spec, outcomes)) is not None:
        outcomes[seq_len] = runs(seq_len)
    return outcomes


@dataclass(frozen=True)
class Search:
    """One planned search: ``cell`` holds every axis of its probes, its ``seq_len`` the first probe's."""

    cell: Cell
    spec: SearchSpec

    def probe(self, seq_len: int) -> Cell:
        return replace(self.cell, seq_len=seq_len)

    def params(self) -> dict[str, Any]:
        """The search as plain JSON types: its probes' parameters but ``seq_len``, and the spec."""
        params = {key: value for key, value in self.cell.params().items() if key != "seq_len"}
        return {**params, "start": self.spec.start, "granularity": self.spec.granularity, "max": self.spec.max}

    @property
    def id(self) -> str:
        """12 hex digits of sha256 over the canonical parameters, as a cell's id."""
        canonical = json.dumps(self.params(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def title(self) -> str:
        limit = f", at most S={self.spec.max}" if self.spec.max is not None else ""
        return f"{self.cell.title}: longest that runs, doubling then bisecting to {self.spec.granularity}{limit}"

    def owns(self, cell: Cell) -> bool:
        """Whether ``cell`` is one of this search's probes."""
        return self.probe(cell.seq_len) == cell


def predicted_longest(
    search: Search, modelled: Callable[[Cell], int | None], kept: Callable[[Cell], int], capacity_bytes: int
) -> int | None:
    """The longest ``seq_len`` the search would find if a probe ran exactly when what a call starts
    with and the memory model's bytes beyond that (``modelled``; None if it does not model the
    probe) fit in ``capacity_bytes``: the model's prediction, at the search's own granularity and
    bound. A call starts with a rank's shard of q, k and v (and of the output gradient, in passes
    with a backward), and what setup keeps beside them (``kept``)."""

    def fits(seq_len: int) -> bool:
        cell = search.probe(seq_len)
        beyond = modelled(cell)
        if beyond is None:
            raise _Unmodelled
        tensors = 3 if cell.pass_name == "forward" else 4
        return tensors * output_bytes(cell) // cell.world_size + kept(cell) + beyond <= capacity_bytes

    try:
        return bounds(run_search(search.spec, fits))[0]
    except _Unmodelled:
        return None


class _Unmodelled(Exception):
    """A probe the memory model has no figure for: the search has no prediction."""
