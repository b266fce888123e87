"""The scaling model: its parts against hand arithmetic, and the report section a fixture renders."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ringbench import records
from ringbench.errors import UserError
from ringbench.report import model, scaling
from ringbench.report.load import load_run
from ringbench.report.render import render_report

FIXTURES = Path(__file__).parent / "fixtures"
MS_PER_BYTE = 1 / 200e6  # 200 GB/s
# A machine as a calibration stores it: 20 µs + 200 GB/s a ring step, 30 µs + 100 GB/s an all-to-all,
# 1 ms per 256 MiB merged, a block 10% slower beside transfers.
CALIBRATION = {
    "world_size": 4,
    "ranks_per_host": 4,
    "device": "fixture GPU",
    "measured_at": "2026-11-29T00:00:00+00:00",
    "ring_step": {"bytes": [4096, 2**20, 2**28], "ms": [0.02, 0.03, 0.02 + 2**28 * MS_PER_BYTE]},
    "all_to_all": {"bytes": [4096, 2**20, 2**28], "ms": [0.03, 0.05, 0.03 + 2**28 * 2 * MS_PER_BYTE]},
    "merge": {"accumulator_mib": 256.0, "ms": 1.0, "path": "triton"},
    "contention": {"alone_ms": 4.0, "beside_transfers_ms": 4.4},
}
SHAPE = model.Shape(batch_size=1, heads=16, head_dim=128, element_bytes=2)


def step_transfer_ms(rows: int) -> float:
    """A ring step's K/V transfer of ``rows`` rows of SHAPE on the fixture machine: 20 µs + bytes at 200 GB/s."""
    return 0.02 + 2 * rows * 16 * 128 * 2 * MS_PER_BYTE


def beside(block_ms: float, transfer_ms: float) -> float:
    """A block with a transfer beside it: 10% slower while the transfer runs."""
    return block_ms + 0.1 * min(block_ms, transfer_ms)


def test_a_link_is_the_smallest_messages_latency_and_the_largest_messages_bandwidth():
    link = model.fit_link(CALIBRATION["ring_step"])
    assert link.latency_ms == 0.02 and link.bytes_per_ms == pytest.approx(200e6, rel=1e-12)
    assert link.ms(0) == 0.0 and link.ms(2e8) == pytest.approx(1.02, rel=1e-12)


def test_block_times_interpolate_on_log_log_axes_and_mark_only_blocks_shorter_than_measured():
    blocks = model.Blocks({("forward", False): ((1024, 1.0), (4096, 8.0))})
    assert blocks.ms(2048, False, "forward") == pytest.approx((2**1.5, False), rel=1e-12)  # slope 1.5
    assert blocks.ms(512, False, "forward") == (0.25, True)  # the shortest's rate, marked
    assert blocks.ms(8192, False, "forward") == (32.0, False)  # the longest's rate
    assert blocks.ms(1024, True, "forward") is None


def test_a_backward_block_is_measured_or_forward_and_backward_less_forward():
    blocks = model.Blocks({("forward", False): ((1024, 1.0),), ("forward+backward", False): ((1024, 3.5),)})
    assert blocks.backward_ms(1024, False) == (2.5, False)
    assert model.Blocks({("forward", False): ((1024, 1.0),)}).backward_ms(1024, False) is None


def machine(gpus_per_node=8):
    return model.Machine.from_calibration(CALIBRATION, inter_node_gbit_s=400.0, gpus_per_node=gpus_per_node)


def test_a_ring_of_one_on_one_gpu_is_the_single_gpu_block_exactly():
    blocks = model.Blocks({("forward", True): ((65536, 30.0),)})
    modelled = model.predict(1, 1, 65536, True, "forward", SHAPE, blocks, machine())
    assert (modelled.ms, modelled.efficiency, modelled.exposed) == (30.0, 1.0, False)


def test_ring_forward_hides_each_transfer_behind_a_slowed_block_and_adds_its_merges():
    blocks = model.Blocks({("forward", False): ((32768, 14.0), (131072, 224.0))})
    modelled = model.predict(1, 4, 131072, False, "forward", SHAPE, blocks, machine())
    # Four steps of a 32K block (14 ms), the first three beside a K/V transfer of 2 × 32K rows × 16
    # heads × 128 × 2 bytes (1.36 ms, hidden), 10% slower while it runs; three merges of a 256 MiB
    # accumulator.
    transfer = step_transfer_ms(32768)
    assert transfer == pytest.approx(1.3622, abs=1e-4) and not modelled.exposed
    expected = 3 * (14.0 + 0.1 * transfer) + 14.0 + 3 * 1.0
    assert modelled.ms == pytest.approx(expected, rel=1e-12)
    assert modelled.efficiency == pytest.approx(224.0 / (4 * expected), rel=1e-12)


def test_ring_steps_take_the_rings_own_calls_where_they_span_the_length_and_the_peers_elsewhere():
    peer = {("forward", False): ((32768, 14.0), (131072, 224.0))}
    blocks = model.Blocks(peer, ring_times={("forward", False): ((32768, 15.0), (65536, 60.0))})
    four = model.predict(1, 4, 131072, False, "forward", SHAPE, blocks, machine())
    # the ring's own 32K block
    assert four.ms == pytest.approx(3 * beside(15.0, step_transfer_ms(32768)) + 15.0 + 3 * 1.0, rel=1e-12)
    assert four.efficiency == pytest.approx(224.0 / (4 * four.ms), rel=1e-12)  # against the peer at 128K
    # 16K blocks lie below the ring's own lengths: the peer's 32K rate, marked as below what was measured.
    eight = model.predict(1, 8, 131072, False, "forward", SHAPE, blocks, machine())
    assert eight.extrapolated and blocks.ms(16384, False, "forward", ring_step=True) == (3.5, True)


def test_causal_zigzag_steps_are_a_causal_block_then_half_blocks_merging_three_quarters_of_the_rows():
    blocks = model.Blocks({("forward", True): ((65536, 30.0),), ("forward", False): ((16384, 2.0), (65536, 32.0))})
    modelled = model.predict(1, 2, 131072, True, "forward", SHAPE, blocks, machine())
    half = 2.0 * (65536 / math.sqrt(2) / 16384) ** 2  # 64K × 32K: a square of 64K/√2, between 16K and 64K
    assert modelled.ms == pytest.approx(beside(30.0, step_transfer_ms(65536)) + half + 0.75 * 1.0 * 2, rel=1e-12)


# Copy-engine ring steps as a calibration stores them: 5 µs + 400 GB/s, no block slower beside them.
COPY_ENGINE = {
    "ring_step": {"bytes": [4096, 2**20, 2**28], "ms": [0.005, 0.01, 0.005 + 2**28 * MS_PER_BYTE / 2]},
    "contention": {"alone_ms": 4.0, "beside_transfers_ms": 3.9},
}


def test_copy_engine_ring_steps_take_their_own_link_and_slowdown_and_nccls_latency_between_nodes():
    assert model.transfers_calibrated(CALIBRATION, copy_engine=False)
    assert not model.transfers_calibrated(CALIBRATION, copy_engine=True)  # a calibration from before them
    assert not model.transfers_calibrated(CALIBRATION | {"copy_engine": None}, copy_engine=True)  # ranks that could not
    calibrated = CALIBRATION | {"copy_engine": COPY_ENGINE}
    assert model.transfers_calibrated(calibrated, copy_engine=True)
    # A calibration measures copy-engine transfers wherever the ranks can use them, as auto then does.
    assert [model.plans_copy_engine({"transfers": t}, calibrated) for t in ("auto", "copy-engine", "nccl")] == [
        True,
        True,
        False,
    ]
    assert [model.plans_copy_engine({"transfers": t}, CALIBRATION) for t in ("auto", "copy-engine", "nccl")] == [
        False,
        True,
        False,
    ]
    assert not model.plans_copy_engine({}, calibrated)  # a strategy without a ring
    copy_engine = model.Machine.from_calibration(calibrated, inter_node_gbit_s=400.0, copy_engine=True)
    assert copy_engine.ring_step.latency_ms == 0.005
    assert copy_engine.ring_step.bytes_per_ms == pytest.approx(400e6, rel=1e-12)
    assert copy_engine.contention == 0.0  # faster beside transfers is noise
    assert copy_engine.inter_node.latency_ms == 0.02 and copy_engine.all_to_all == machine().all_to_all
    blocks = model.Blocks({("forward", False): ((32768, 14.0), (131072, 224.0))})
    modelled = model.predict(1, 4, 131072, False, "forward", SHAPE, blocks, copy_engine)
    # Four steps of a 32K block, none slower beside its transfer (0.69 ms, hidden), and three merges.
    assert modelled.ms == pytest.approx(4 * 14.0 + 3 * 1.0, rel=1e-12) and not modelled.exposed


def test_ulysses_waits_for_both_all_to_alls_around_attention_on_its_heads():
    blocks = model.Blocks({("forward", False): ((131072, 224.0),)})
    modelled = model.predict(2, 2, 131072, False, "forward", SHAPE, blocks, machine())
    shard = 65536 * 16 * 128 * 2 / 2  # the half of a rank's shard of one tensor that leaves it
    all_to_all = [0.03 + tensors * shard * 2 * MS_PER_BYTE for tensors in (3, 1)]
    assert modelled.ms == pytest.approx(sum(all_to_all) + 224.0 / 2, rel=1e-12)


def test_a_rank_on_fewer_heads_takes_the_peers_time_on_that_many_where_the_run_has_it():
    # The peer on 8 heads at 128K: 118 ms, 5% more per head than its 16 heads' 224 ms.
    cell = {"implementation": "sdpa", "peer": True, "world_size": 1, "ring_size": None, "status": records.OK}
    cell |= {"kernel": "cudnn", "dtype": "bfloat16", "batch_size": 1, "head_dim": 128}
    cell |= {"pass": "forward", "causal": False, "seq_len": 131072}
    blocks = model.blocks_of(
        pd.DataFrame([cell | {"heads": 16, "median_ms": 224.0}, cell | {"heads": 8, "median_ms": 117.6}])
    )
    sixteen, eight = blocks["cudnn", "bfloat16", 1, 16, 128], blocks["cudnn", "bfloat16", 1, 8, 128]
    assert sixteen.on(8.0, 16) == (eight, 1.0) and not eight.fewer_heads
    # Ulysses on two GPUs attends 8 heads: the peer's 8 heads' time, not half its 16 heads'.
    shard = 65536 * 16 * 128 * 2 / 2
    all_to_alls = sum(0.03 + tensors * shard * 2 * MS_PER_BYTE for tensors in (3, 1))
    assert model.predict(2, 2, 131072, False, "forward", SHAPE, sixteen, machine()).ms == pytest.approx(
        all_to_alls + 117.6, rel=1e-12
    )
    # On four it attends 4, which the peer did not run: its 16 heads' time in proportion.
    assert sixteen.on(4.0, 16) == (sixteen, 0.25)


def test_an_all_to_all_beyond_a_node_sends_its_other_nodes_pieces_at_the_inter_node_rate():
    # 16 ranks, 8 a node: 7 of 15 pieces stay within the node, 8 go out at 50 GB/s.
    nbytes = 15e6
    assert machine().all_to_all_ms(nbytes, 16) == pytest.approx(max(0.03 + 7e6 / 100e6, 0.02 + 8e6 / 50e6), rel=1e-12)
    assert machine().all_to_all_ms(nbytes, 8) == pytest.approx(0.03 + 15e6 / 100e6, rel=1e-12)


def test_a_ring_across_nodes_exposes_transfers_that_outlast_its_blocks():
    blocks = model.Blocks({("forward", False): ((1024, 0.02), (131072, 224.0))})
    modelled = model.predict(1, 16, 131072, False, "forward", SHAPE, blocks, machine())
    assert modelled.exposed and not model.predict(1, 4, 131072, False, "forward", SHAPE, blocks, machine()).exposed


def with_calibration(tmp_path, entry=CALIBRATION):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "multi-process", run)
    records.write_calibration(run, entry)
    return run


@pytest.mark.parametrize(
    ("implementation", "options", "causal", "degree"),
    [
        ("ring", {"zigzag": True, "transfers": "nccl"}, True, 1),
        ("ring", {"zigzag": False}, False, 1),
        ("ring", {"zigzag": False}, True, None),  # ranks wait on each other's unequal work
        ("ring", {"zigzag": True, "transfers": "copy-engine"}, False, 1),  # on its own calibration
        ("usp", {"zigzag": True, "ulysses_degree": 2}, True, 2),
        ("ulysses", {}, True, 4),
        ("torch-cp", {}, False, None),
    ],
)
def test_the_model_covers_the_strategies_and_transfers_it_was_calibrated_for(implementation, options, causal, degree):
    row = pd.Series(
        {"implementation": implementation, "options": json.dumps(options), "causal": causal, "world_size": 4}
    )
    assert model.degree_of(row) == degree


def test_the_report_models_every_ring_cell_of_a_recorded_run_as_the_golden_says(tmp_path):
    run = load_run(with_calibration(tmp_path))
    section = "\n".join(scaling.lines(run.frame, run.calibration, 2)) + "\n"
    assert section == (FIXTURES / "scaling.md").read_text(encoding="utf-8")
    # One row by hand: ring on four processes, forward: the single-GPU block of 32K at the 128K cell's
    # rate (shorter than any measured: marked), transfers hidden, four steps as above.
    block = 228.00193786621094 / 16
    expected = 228.00193786621094 / (4 * (3 * beside(block, step_transfer_ms(32768)) + block + 3 * 1.0))
    assert f"| 0.893      | {expected:.3f}‡  |" in section
    report = render_report([run])
    assert "## Scaling model" in report
    assert (
        "- Scaling model against the multi-process cells: within 5% in 1 of 4 cells (largest error 5.6%), "
        "as its section shows\n"
    ) in report


def test_a_run_without_calibration_has_no_scaling_section():
    run = load_run(FIXTURES / "multi-process")
    assert run.calibration == {} and "Scaling model" not in render_report([run])


def test_a_broken_calibration_warns_and_leaves_the_cells_alone(tmp_path):
    run = with_calibration(tmp_path)
    (run / records.CALIBRATION_FILE).write_text(json.dumps({"schema_version": 9, "world_sizes": {}}))
    loaded = load_run(run)
    assert loaded.warnings == [
        f"{run / records.CALIBRATION_FILE}: cannot read it (ValueError: schema_version 9, this version reads 1); "
        "the scaling model is left out"
    ]
    assert len(loaded.frame) == 24 and "Scaling model" not in render_report([loaded])
    with pytest.raises(UserError):
        records.write_calibration(run, CALIBRATION)  # never overwrites what it cannot read


def test_a_calibrated_run_draws_the_projection():
    from ringbench.report import plots

    run = load_run(FIXTURES / "multi-process")
    assert "scaling" not in plots.figures(run.frame, run.calibration)
    figure = plots.figures(run.frame, {4: CALIBRATION})["scaling"]
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == [f"{tokens} tokens, forward+backward, non-causal" for tokens in ("128K", "1M", "16M")]
    assert [line.get_label() for line in figure.axes[0].lines] == ["ring", "ulysses", "usp, best degree"]


def test_a_run_without_forward_cells_says_the_model_cannot_time_it_and_draws_nothing(tmp_path):
    from ringbench.report import plots

    run_dir = with_calibration(tmp_path)
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    (run_dir / "records.jsonl").write_text("\n".join(line for line in lines if '"pass": "forward"' not in line) + "\n")
    run = load_run(run_dir)
    assert set(run.frame["pass"]) == {"forward+backward"}
    section = scaling.lines(run.frame, run.calibration, 2)
    assert section[6] == (
        "No cell of this run can be modelled: the model needs the peer's forward cells, beside any "
        "forward+backward ones, to time a ring step's forward and backward apart."
    )
    assert "### Model against measurement" not in section and "scaling" not in plots.figures(run.frame, run.calibration)


def test_a_cell_the_host_launches_slower_than_its_modelled_gpu_time_is_modelled_at_the_hosts_pace(tmp_path):
    run_dir = with_calibration(tmp_path)
    stored = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    for record in stored:
        if (record["implementation"], record["world_size"], record["pass"], record["causal"]) == (
            "ring",
            4,
            "forward",
            False,
        ):
            record["modes"].update(launch_ms=200.0, device_ms=60.0)
    (run_dir / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in stored))
    report = render_report([load_run(run_dir)])
    # The model's GPU time (60.4 ms, as the golden's row) is shorter than the launch: the call runs at the host's pace.
    assert f"| 0.893      | {228.00193786621094 / (4 * 200.0):.3f}‡§ | -68.1%  |" in report
    assert "§: the host takes longer to launch the call (measured in the cell) than the modelled GPU time" in report
    assert (
        "- In 1 of 16 multi-process cells the host takes longer to launch a call than the GPUs take to run it "
        "(the most, ring kernel=cudnn zigzag=true (4 processes) S=131072 forward non-causal: 200.00 ms of launch "
        "against 60.00 ms of GPU work): their times measure the host, as CUDA graphs are not captured across processes. "
        "Compare them as the host's, or at longer sequences.\n"
    ) in report
    # Without the launch probe (as recorded before it ran across processes) nothing is said.
    assert "§" not in render_report([load_run(with_calibration(tmp_path / "plain"))])


def test_ulysses_own_rows_first_hides_the_inbound_all_to_all_behind_the_own_diagonal_and_cuts_the_rest():
    blocks = model.Blocks({("forward", True): ((65536, 30.0),), ("forward", False): ((65536, 55.0),)})
    modelled = model.predict(2, 2, 131072, True, "forward", SHAPE, blocks, machine(), own_rows_first=True)
    # By hand, on 8 of 16 heads (half of each block's time): the own 64K diagonal (15 ms, 10% slower
    # while the inbound all-to-all of q, k, v runs beside it: 3 × 128 MiB at 100 GB/s, 4.1 ms, hidden);
    # the other block's diagonal (15 ms) and its keys before it, a 64K square (27.5 ms); one merge of
    # 64K rows × 8 heads of float32 (256 MiB, 1 ms); the output's all-to-all (0.03 ms + 128 MiB at
    # 100 GB/s).
    inbound = 0.03 + 3 * 2**27 * 2 * MS_PER_BYTE
    expected = beside(15, inbound) + 15 + 27.5 + 1.0 + 0.03 + 2**27 * 2 * MS_PER_BYTE
    assert modelled.ms == pytest.approx(expected, rel=1e-12)
    plain = model.predict(2, 2, 131072, True, "forward", SHAPE, blocks, machine())
    assert plain.ms == pytest.approx(
        0.03 + 3 * 2**27 * 2 * MS_PER_BYTE + 60 + 0.03 + 2**27 * 2 * MS_PER_BYTE, rel=1e-12
    )


@pytest.mark.parametrize(
    ("implementation", "options", "world_size", "causal", "first"),
    [
        ("ulysses", {"own_rows_first": "causal", "chunks": 1}, 2, True, True),
        ("ulysses", {"own_rows_first": "causal", "chunks": 1}, 2, False, False),
        ("ulysses", {"own_rows_first": "always", "chunks": 1}, 2, False, True),
        ("ulysses", {"own_rows_first": "never", "chunks": 1}, 2, True, False),
        ("ulysses", {"own_rows_first": True}, 2, False, True),  # recorded while the option was yes or no
        ("ulysses", {}, 2, True, False),  # recorded before the option: the plain form
        # usp as a ring of one runs ulysses' default: its own rows first in causal attention
        ("usp", {"ulysses_degree": 2}, 2, True, True),
        ("usp", {"ulysses_degree": 2}, 2, False, False),
        ("usp", {"ulysses_degree": 2}, 4, True, False),
        ("usp", {"ulysses_degree": 1}, 2, True, False),
    ],
)
def test_the_model_attends_own_rows_first_where_the_cell_did(implementation, options, world_size, causal, first):
    assert model.attends_own_rows_first(implementation, options, world_size, causal) is first
