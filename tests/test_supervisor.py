"""The supervisor's judgement of a worker that stopped, and how it follows the records file."""

import json
import time

from ringbench import records
from ringbench.run import folder, jobs
from ringbench.run.pipeline import make_record
from ringbench.run.supervisor import WorkerEnd, _WorldSize, blame
from ringbench.vocabulary import Cell


def test_a_worker_that_stopped_between_cells_after_progress_is_not_blamed():
    assert blame(WorkerEnd(recorded=2, in_flight=False, timed_out=False, returncode=0), 30, "log") is None


def test_a_worker_that_died_in_a_cell_is_blamed_for_it():
    assert blame(WorkerEnd(recorded=2, in_flight=True, timed_out=False, returncode=-11), 30, "Segmentation fault") == (
        records.CRASHED,
        "the worker exited with code -11 during this cell; its output ended: Segmentation fault",
    )


def test_a_worker_that_never_finished_a_cell_is_blamed_so_it_cannot_loop():
    assert blame(WorkerEnd(recorded=0, in_flight=False, timed_out=False, returncode=3), 30, "") == (
        records.CRASHED,
        "the worker exited with code 3 before starting this cell; its output ended: ",
    )


def test_a_cell_past_its_timeout_is_recorded_as_such():
    assert blame(WorkerEnd(recorded=0, in_flight=True, timed_out=True, returncode=-9), 8, "busy") == (
        records.TIMEOUT,
        "the cell ran past cell_timeout_s (8 s) and its worker was stopped; its output ended: busy",
    )


def test_a_worker_stopped_before_it_started_its_cell_says_so():
    assert blame(WorkerEnd(recorded=0, in_flight=False, timed_out=True, returncode=-9), 8, "starting") == (
        records.TIMEOUT,
        "the worker had not started this cell 68 s after its launch or its last record (the process group's "
        "timeout, cell_timeout_s plus 60 s) and was stopped; its output ended: starting",
    )


def test_a_cells_time_counts_from_the_workers_note_and_a_worker_starting_is_given_the_groups_timeout(tmp_path):
    cell = Cell("ring", (), 64, 2, 1, 1, 8, "float32", False, "forward", world_size=2)
    world = _WorldSize(tmp_path, 2, [jobs.OneCell(cell)], records.RecordTail(tmp_path), lambda record: None)
    launched = time.time() - 30  # 30 s ago, with no note yet: the worker is still starting
    assert not world.overdue(launched, timeout_s=8) and world.overdue(launched, timeout_s=-40)
    folder.mark_inflight(tmp_path, cell)
    assert not world.overdue(launched, timeout_s=8)  # the cell itself has only just started
    note = tmp_path / "inflight-2.json"
    note.write_text(json.dumps({**json.loads(note.read_text()), "started": time.time() - 9}))
    assert world.overdue(launched, timeout_s=8)


def _line(seq_len):
    cell = Cell("sdpa", (("backend", "auto"),), seq_len, None, 1, 1, 8, "float32", False, "forward")
    return json.dumps(make_record(cell, {"status": records.SKIPPED}).to_json()) + "\n", cell.id


def test_the_tail_reads_each_record_once_and_waits_for_a_line_being_written(tmp_path):
    (before, _), (first, first_id), (second, second_id) = _line(8), _line(16), _line(32)
    path = tmp_path / records.RECORDS_FILE
    path.write_text(before)
    tail = records.RecordTail(tmp_path)  # starts where the file ends: what was there is the run's past
    assert tail.new() == []
    with path.open("a") as handle:
        handle.write(first + second[:10])
    assert [record.cell_id for record in tail.new()] == [first_id]
    with path.open("a") as handle:
        handle.write(second[10:])
    assert [record.cell_id for record in tail.new()] == [second_id]
    assert tail.new() == []
