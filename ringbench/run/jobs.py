"""What a worker is handed to run: planned cells, and longest-sequence searches whose probes become
cells one at a time as their outcomes come in.

A job's ``current`` cell is the one to run next (None once the job is done), and ``note`` takes
that cell's record. Both sides hold the same jobs: the worker runs their cells, and the supervisor,
following the records, knows which cell a worker that died was running. Every rank of a group
notes the same agreed record, so all derive the same next probe.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ringbench import records
from ringbench.schema import Record
from ringbench.sweep.longest import Search, next_probe
from ringbench.sweep.plan import Plan
from ringbench.vocabulary import Cell


@dataclass
class OneCell:
    """A planned cell: done once it has a record."""

    cell: Cell
    done: bool = False

    def current(self) -> Cell | None:
        return None if self.done else self.cell

    def note(self, record: Record) -> None:
        self.done = True

    def as_json(self) -> dict[str, Any]:
        return {"cell_id": self.cell.id}

    @property
    def world_size(self) -> int:
        return self.cell.world_size


@dataclass
class Searching:
    """A search and the outcomes of its probes so far, by ``seq_len``: only ``ok`` counts as running
    (an ``oom``, ``error``, ``wrong``, ``skipped``, ``crashed`` or ``timeout`` probe does not)."""

    search: Search
    outcomes: dict[int, bool] = field(default_factory=dict)

    def current(self) -> Cell | None:
        seq_len = next_probe(self.search.spec, self.outcomes)
        return None if seq_len is None else self.search.probe(seq_len)

    def note(self, record: Record) -> None:
        self.outcomes[record.seq_len] = record.status == records.OK

    def as_json(self) -> dict[str, Any]:
        return {"search_id": self.search.id, "outcomes": sorted(self.outcomes.items())}

    @property
    def world_size(self) -> int:
        return self.search.cell.world_size


Job = OneCell | Searching


def note_elsewhere(pending: Iterable[Job], record: Record, job: Job) -> None:
    """A cell ``job`` ran may be a probe another search would make (a config's listed cell at a
    length the search reaches): each such search takes its outcome too, and never runs it again."""
    for other in pending:
        if other is not job and isinstance(other, Searching) and other.search.owns(record.cell):
            other.outcomes.setdefault(record.seq_len, record.status == records.OK)


def planned(plan: Plan, done: Iterable[Record]) -> list[Job]:
    """The plan's jobs that are not done yet, given the records of cells done (``records.done``):
    cells without one, and searches with the outcomes of their probes that have one."""
    done = list(done)  # read twice
    done_ids = {record.cell_id for record in done}
    jobs: list[Job] = [OneCell(cell) for cell in plan.cells if cell.id not in done_ids]
    for search in plan.searches:
        searching = Searching(search)
        for record in done:
            if search.owns(record.cell):
                searching.note(record)
        jobs.append(searching)
    return [job for job in jobs if job.current() is not None]


def from_json(entries: list[dict[str, Any]], plan: Plan) -> list[Job]:
    """The jobs a pending file lists (``as_json`` of each)."""
    cells = {cell.id: cell for cell in plan.cells}
    searches = {search.id: search for search in plan.searches}
    return [
        OneCell(cells[entry["cell_id"]])
        if "cell_id" in entry
        else Searching(searches[entry["search_id"]], {seq_len: ran for seq_len, ran in entry["outcomes"]})
        for entry in entries
    ]
