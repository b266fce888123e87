"""A GPU's clocks while a cell is timed: the readings' sum-up, the watch that takes them around the
samples alone, the record that keeps them, and the report's table of them."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ringbench.report import load_run, render_report
from ringbench.run import clocks
from ringbench.run.timing import measure
from ringbench.schema import GpuState, Record
from ringbench.sweep.config import TimingBudget

FIXTURES = Path(__file__).parent / "fixtures"


def test_readings_sum_up_to_the_mean_and_lowest_clock_the_mean_power_the_hottest_die_and_every_reason():
    readings = [
        clocks.Reading(1600.0, 690.0, 61.0, 0x4),
        clocks.Reading(1500.0, 700.0, 63.0, 0x4 | 0x20),
        clocks.Reading(1700.0, 680.0, 62.0, 0x0),
        clocks.Reading(1620.0, 694.0, 60.0, 0x200),
    ]
    assert clocks.summarize(readings, 1, 1980.0) == GpuState(
        rank=1,
        sm_clock_mhz=1605.0,
        sm_clock_min_mhz=1500.0,
        sm_clock_top_mhz=1980.0,
        power_w=691.0,
        temperature_c=63.0,
        held_by=("software power cap", "software thermal slowdown", "other (0x200)"),
        readings=4,
    )


class FakeGpu:
    """A GPU whose clock falls by 10 MHz a reading, whose reads fail after ``fails_after`` of them."""

    top_mhz = 1980.0

    def __init__(self, fails_after: int | None = None):
        self.reads, self.fails_after = 0, fails_after

    def read(self) -> clocks.Reading:
        if self.fails_after is not None and self.reads >= self.fails_after:
            raise RuntimeError("NVML lost the GPU")
        self.reads += 1
        return clocks.Reading(1980.0 - 10 * (self.reads - 1), 500.0, 50.0, 0x4)


def test_a_watch_reads_at_entry_while_open_and_at_exit():
    watch = clocks.Watch(gpu := FakeGpu(), interval_s=0.01)
    with watch:
        while gpu.reads < 4:  # the entry's reading and the thread's
            pass
    summed = watch.state(0)
    assert summed is not None and summed.readings == gpu.reads >= 5  # entry, 3 or more, exit
    assert summed.sm_clock_min_mhz == 1980.0 - 10 * (gpu.reads - 1)
    assert summed.sm_clock_mhz == pytest.approx(1980.0 - 5 * (gpu.reads - 1))
    assert summed.held_by == ("software power cap",)


def test_a_watch_whose_gpu_stops_answering_keeps_what_it_read_and_costs_the_cell_nothing():
    watch = clocks.Watch(gpu := FakeGpu(fails_after=2), interval_s=0.001)
    with watch:
        while gpu.reads < 2:
            pass
    summed = watch.state(0)
    assert summed is not None and summed.readings == 2 and summed.sm_clock_min_mhz == 1970.0
    unread = clocks.Watch(FakeGpu(fails_after=0))
    with unread:
        pass
    assert unread.state(0) is None


def test_on_the_cpu_there_is_nothing_to_read():
    assert clocks.nvml_of(torch.device("cpu")) is None
    with (watch := clocks.Watch(None)):
        pass
    assert watch.state(0) is None


class Counting:
    """A context that notes how many calls had been made when it was entered and left."""

    def __init__(self, calls: list[int]):
        self.calls, self.seen = calls, []

    def __enter__(self):
        self.seen.append(len(self.calls))

    def __exit__(self, *exc):
        self.seen.append(len(self.calls))


def test_the_watch_covers_the_samples_and_not_the_warm_up():
    calls: list[int] = []
    around = Counting(calls)
    timing = measure(
        lambda: calls.append(1),
        torch.device("cpu"),
        TimingBudget(warmup_ms=1, rep_ms=2, min_reps=3, max_reps=5),
        while_sampling=around,
    )
    assert around.seen == [len(timing.warmup_ms), len(calls)]
    assert len(calls) - len(timing.warmup_ms) == len(timing.samples_ms) * timing.calls_per_sample


STATES = (
    GpuState(0, 1587.4, 1365.0, 1980.0, 686.0, 61.0, ("software power cap",), 70),
    GpuState(1, 1618.2, 1395.0, 1980.0, 686.2, 66.0, ("software power cap", "software thermal slowdown"), 71),
)


def test_a_record_keeps_every_ranks_gpu_and_a_rank_shares_own_and_reads_them_back_equal():
    lines = (FIXTURES / "multi-process" / "records.jsonl").read_text().splitlines()
    across, one_device = (Record.from_json(json.loads(lines[index])) for index in (8, 1))
    assert across.gpus is None and "gpus" not in across.to_json()  # older records read none
    watched = replace(across, gpus=STATES)
    stored = json.loads(json.dumps(watched.to_json()))
    assert stored["gpus"][1] == {
        "rank": 1,
        "sm_clock_mhz": 1618.2,
        "sm_clock_min_mhz": 1395.0,
        "sm_clock_top_mhz": 1980.0,
        "power_w": 686.2,
        "temperature_c": 66.0,
        "held_by": ["software power cap", "software thermal slowdown"],
        "readings": 71,
    }
    assert Record.from_json(stored) == watched
    assert one_device.projected is not None and "gpu" not in one_device.to_json()["projected"]
    share = replace(one_device, gpus=STATES[:1], projected=replace(one_device.projected, gpu=STATES[0]))
    stored = json.loads(json.dumps(share.to_json()))
    assert stored["projected"]["gpu"] == stored["gpus"][0] and Record.from_json(stored) == share


def _watched_run(tmp_path: Path, ring_states: tuple[GpuState, ...]) -> str:
    """The multi-process fixture's report with clocks on its single-GPU `sdpa` forward (1,599 MHz)
    and its two-process `ring` forward (``ring_states``)."""
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "multi-process", run_dir)
    watched = []
    for index, line in enumerate((run_dir / "records.jsonl").read_text().splitlines()):
        record = Record.from_json(json.loads(line))
        if record.pass_name == "forward" and not record.causal and record.implementation == "sdpa":
            record = replace(record, gpus=(replace(STATES[0], sm_clock_mhz=1599.0, held_by=()),))
        elif index == 8:  # ring, 2 processes, forward
            record = replace(record, gpus=ring_states)
        watched.append(json.dumps(record.to_json()))
    (run_dir / "records.jsonl").write_text("\n".join(watched) + "\n")
    return render_report([load_run(run_dir)], plots_dir=None)


def test_the_report_shows_the_slowest_gpus_clock_beside_the_board_top_and_what_held_it(tmp_path):
    markdown = _watched_run(tmp_path, STATES)
    section = markdown.split("**SM clock while the samples ran")[1].split("\n\n", 2)[1]
    assert section == (
        "| implementation                | run as      |                                                       S=131072 |\n"
        "|:------------------------------|:------------|---------------------------------------------------------------:|\n"
        "| sdpa backend=cudnn            | no ring     |                                                 1,599 of 1,980 |\n"
        "| ring kernel=cudnn zigzag=true | ring 4      |                                                                |\n"
        "| ring kernel=cudnn zigzag=true | 2 processes | 1,587 of 1,980 (software power cap, software thermal slowdown) |\n"
        "| ring kernel=cudnn zigzag=true | 4 processes |                                                                |"
    )
    assert markdown.count("**SM clock while the samples ran") == 1  # only the shape that has them
    assert "SM clock was over" not in markdown  # 1,587 against 1,599 MHz: 0.7% apart


def test_a_cell_whose_clock_was_far_from_its_peers_is_named_among_what_to_distrust(tmp_path):
    markdown = _watched_run(tmp_path, (replace(STATES[0], sm_clock_mhz=1560.0), STATES[1]))
    distrust = markdown.split("## What to distrust\n\n")[1].split("\n\n")[0]
    assert (
        "- In 1 multi-process cell the slowest GPU's SM clock was over 2% from that of the single-device cell "
        "its efficiency is set against (the most, ring kernel=cudnn zigzag=true (2 processes) S=131072 forward "
        "non-causal: "
        "1,560 against 1,599 MHz): their efficiency carries that difference, which comes from the GPUs' power "
        "and temperature, not from the code. Read it beside the clock tables under each shape."
    ) in distrust.splitlines()


def test_a_gpu_whose_clocks_cannot_be_read_says_why_and_the_cpu_has_nothing_to_say(monkeypatch):
    def refuse(device):
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(clocks, "Nvml", refuse)
    clocks._opened.cache_clear()
    try:
        gpu = torch.device("cuda", 0)
        assert clocks.nvml_of(gpu) is None
        assert clocks.unreadable(gpu) == "RuntimeError: NVML Shared Library Not Found"
        assert clocks.unreadable(torch.device("cpu")) is None and clocks.nvml_of(torch.device("cpu")) is None
    finally:
        clocks._opened.cache_clear()


def test_a_run_whose_gpu_clocks_could_not_be_read_says_so_among_what_to_distrust(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "multi-process", run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    meta["environment"]["clocks_unreadable"] = "NVMLError_LibraryNotFound: NVML Shared Library Not Found"
    (run_dir / "run.json").write_text(json.dumps(meta))
    distrust = render_report([load_run(run_dir)], plots_dir=None).split("## What to distrust\n\n")[1].split("\n\n")[0]
    assert (
        "- The GPUs' clocks could not be read through NVML (NVMLError\\_LibraryNotFound: NVML Shared Library Not "
        "Found): no cell says what SM clock its samples ran at, so differences of clock between cells go unseen."
    ) in distrust.splitlines()
    assert "could not be read through NVML" not in (FIXTURES / "multi-process.md").read_text()
