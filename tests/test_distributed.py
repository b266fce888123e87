"""Real process groups on the CPU (gloo), started by `ringbench run` through torch.distributed.run."""

import json
import shutil

from conftest import PLUGINS
from typer.testing import CliRunner

from ringbench import records
from ringbench.attention import blocks
from ringbench.cli import app
from ringbench.report import model
from ringbench.run import calibrate

TIMING = "timing: {warmup_ms: 1, rep_ms: 2, min_reps: 2, max_reps: 3}\n"


def run_sweep(write_config, body):
    path = write_config(body + TIMING)
    out = path.parent / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    stored = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    return run_dir, stored


def assert_matches_the_reference_on_every_rank(record):
    """A 64-token cell ran on every rank and matched the float64 reference, gradients included."""
    assert record["status"] == "ok", record["error"]
    check = record["check"]
    assert check["rows_checked"] == 64 and check["rel_error"] < 1e-5, check
    if record["pass"] != "forward":
        assert check["gradients"]["checked"] and check["gradients"]["rel_error"] < 1e-5, check
    assert [rank["rank"] for rank in record["ranks"]] == list(range(record["world_size"]))


def test_world_sizes_one_and_two_in_one_run_match_the_reference(write_config):
    run_dir, stored = run_sweep(
        write_config,
        (
            "implementations:\n  - ring\n  - {name: ring, options: {zigzag: true}}\n"
            # One pattern within each rank's shard, one spanning both ranks (only its sparse rows travel).
            "  - {name: ring-dilated, options: {segment_lengths: [16, 64], dilation_rates: [1, 2]}}\n"
            "seq_lens: [64]\nworld_sizes: [1, 2]\nheads: [2]\nhead_dims: [8]\ndtypes: [float32]\ncausal: [false, true]\n"
        ),
    )
    planned = json.loads((run_dir / "run.json").read_text())["planned"]
    assert sorted(r["cell_id"] for r in stored) == sorted(p["cell_id"] for p in planned) and len(stored) == 12
    distributed = [r for r in stored if r["world_size"] == 2]
    assert len(distributed) == 6 and {
        (r["implementation"], r["causal"], r["options"].get("zigzag")) for r in distributed
    } == {
        ("ring", False, False),
        ("ring", False, True),
        ("ring", True, False),
        ("ring", True, True),
        ("ring-dilated", False, None),
        ("ring-dilated", True, None),
    }
    for record in distributed:
        assert record["status"] == "ok", record["error"]
        assert (
            record["ring_size"] == 2 and record["check"]["rows_checked"] == 64 and record["check"]["rel_error"] < 1e-5
        )
        assert [rank["rank"] for rank in record["ranks"]] == [0, 1]
        # The recorded median is over the slowest rank of each repetition.
        assert record["stats"]["median_ms"] >= min(rank["median_ms"] for rank in record["ranks"])
        # K and V of a 32-row shard (B=1, H=2, D=8, float32) in the one ring step of two ranks; the
        # dilated pattern spanning both ranks sends only its 16 kept rows.
        rows = 32 if record["implementation"] == "ring" else 16
        assert record["comm"]["sent_bytes_per_call"] == 2 * 2 * rows * 8 * 4
        assert 0 <= record["comm"]["wait_share"] <= 1 and len(record["comm"]["ranks"]) == 2
    # The two-process worker measured the links once, for the scaling model, at every message size.
    (calibrated,) = records.read_calibration(run_dir).values()
    assert calibrated["world_size"] == 2 and calibrated["device"] == "cpu" and calibrated["contention"] is None
    assert calibrated["copy_engine"] is None  # its ranks are no GPUs
    for pattern in ("ring_step", "all_to_all"):
        assert calibrated[pattern]["bytes"] == calibrate.SIZES["cpu"]
        assert all(ms > 0 for ms in calibrated[pattern]["ms"])


def test_failures_on_ranks_become_the_cells_status_and_close_runs_on_every_rank(write_config):
    _, stored = run_sweep(
        write_config,
        (
            "plugins: [fake_impls]\nimplementations:\n  - test-rank-oom\n  - torch-cp\n  - test-patching\n"
            "  - test-bad-close\n  - {name: test-patching, options: {tag: 1}}\n  - ring\n"
            "seq_lens: [32]\nworld_sizes: [2]\nheads: [1]\nhead_dims: [8]\ndtypes: [float32]\n"
        ),
    )
    by_name = {(r["implementation"], r["options"].get("tag")): r for r in stored}
    assert len(stored) == 6 and all(r["world_size"] == 2 for r in stored)
    assert by_name["test-rank-oom", None]["status"] == "oom"
    assert by_name["test-rank-oom", None]["error"]["message"] == "rank 1: CUDA out of memory on the second rank"
    # PyTorch's context parallel shards only CUDA kernels: a clear error, agreed by both ranks, no hang.
    assert by_name["torch-cp", None]["status"] == "error"
    assert by_name["torch-cp", None]["error"]["message"] == (
        "rank 0: torch-cp needs CUDA devices: PyTorch's context parallel shards only its CUDA SDPA kernels"
    )
    # The second test-patching cell starts only if close() undid the first one's patch on its rank.
    for key in [("test-patching", 0), ("test-patching", 1), ("ring", None)]:
        assert by_name[key]["status"] == "ok", by_name[key]["error"]
    # Communication the clock never saw (as torch-cp's, inside PyTorch) is not measured, never zero.
    assert by_name["test-patching", 0]["comm"] is None and by_name["ring", None]["comm"] is not None
    assert by_name["test-bad-close", None]["error"]["message"] == "rank 0: could not undo the setup"


def test_a_dying_or_hanging_rank_costs_only_its_cell(write_config):
    run_dir, stored = run_sweep(
        write_config,
        (
            "plugins: [fake_impls]\nimplementations: [test-rank-exit, test-rank-hang, ring]\ncell_timeout_s: 12\n"
            "seq_lens: [32]\nworld_sizes: [2]\nheads: [1]\nhead_dims: [8]\ndtypes: [float32]\n"
        ),
    )
    by_name = {r["implementation"]: r for r in stored if r["world_size"] == 2}
    assert by_name["test-rank-exit"]["status"] == "crashed"
    assert "the worker exited with code" in by_name["test-rank-exit"]["error"]["message"]
    # Rank 0 waits in a collective for rank 1, which never comes: the cell timeout ends both.
    assert by_name["test-rank-hang"]["status"] == "timeout"
    assert by_name["ring"]["status"] == "ok"
    # One log, each of the three launches under a line of its own; a cell's blame quotes its own launch only.
    log = (run_dir / "worker-2.log").read_text()
    assert [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("=== ")] == [
        f"a worker of 2 process(es) starts, {pending} job(s) pending, from {name} at seq_len 32 ==="
        for pending, name in [(3, "test-rank-exit"), (2, "test-rank-hang"), (1, "ring")]
    ]
    assert "exitcode" in by_name["test-rank-exit"]["error"]["message"]  # the launcher's report of the dead rank
    assert "exitcode" not in by_name["test-rank-hang"]["error"]["message"]


def test_a_cell_that_fails_across_processes_leaves_the_next_cell_a_fresh_group(write_config):
    run_dir, stored = run_sweep(
        write_config,
        (
            "plugins: [fake_impls]\nimplementations: [test-rank-unmatched, ring]\ncell_timeout_s: 20\n"
            "seq_lens: [32]\nworld_sizes: [2]\nheads: [1]\nhead_dims: [8]\ndtypes: [float32]\n"
        ),
    )
    assert [(r["implementation"], r["status"]) for r in stored] == [("test-rank-unmatched", "oom"), ("ring", "ok")]
    # The collective rank 1 left behind would meet ring's first one on the old group: a fresh worker runs ring.
    assert (run_dir / "worker-2.log").read_text().count("ringbench worker") == 2 * 2


def test_a_rank_failing_while_another_waits_on_it_is_recorded_as_its_failure_not_a_timeout(write_config):
    run_dir, stored = run_sweep(
        write_config,
        (
            "plugins: [fake_impls]\nimplementations: [test-rank-oom-midway, ring]\ncell_timeout_s: 300\n"
            "seq_lens: [32]\nworld_sizes: [2]\nheads: [1]\nhead_dims: [8]\ndtypes: [float32]\n"
        ),
    )
    assert [(r["implementation"], r["status"]) for r in stored] == [("test-rank-oom-midway", "oom"), ("ring", "ok")]
    # Rank 0 never gets past its receive: rank 1 records the cell and ends the worker; a fresh one runs ring.
    assert stored[0]["error"]["message"] == (
        "rank 1: CUDA out of memory on the second rank, midway (rank(s) 0 did not get past the failure "
        "within 10 s: the worker was ended to free them)"
    )
    assert (run_dir / "worker-2.log").read_text().count("ringbench worker") == 2 * 2


def test_four_processes_with_segments_spanning_two_and_four_ranks(write_config):
    _, stored = run_sweep(
        write_config,
        (
            "implementations:\n  - {name: ring, options: {zigzag: true}}\n"
            "  - {name: ring-dilated, options: {segment_lengths: [16, 32, 64], dilation_rates: [1, 2, 4]}}\n"
            "seq_lens: [64]\nworld_sizes: [4]\nheads: [4]\nhead_dims: [8]\ndtypes: [float32]\ncausal: [true]\n"
            "passes: [forward, forward+backward]\n"
        ),
    )
    assert len(stored) == 4
    for record in stored:
        assert record["world_size"] == 4 and record["status"] == "ok", record["error"]
        assert record["check"]["rows_checked"] == 64 and record["check"]["rel_error"] < 1e-5
        assert len(record["ranks"]) == 4
        if record["pass"] == "forward+backward":
            assert record["check"]["gradients"]["rel_error"] < 1e-5


def test_ring_gradients_across_two_processes_match_the_reference(write_config):
    _, stored = run_sweep(
        write_config,
        (
            "implementations:\n  - ring\n  - {name: ring, options: {zigzag: true}}\n"
            # One pattern within each rank's shard, one spanning both ranks (its sparse rows and their sums travel).
            "  - {name: ring-dilated, options: {segment_lengths: [16, 64], dilation_rates: [1, 2]}}\n"
            "seq_lens: [64]\nworld_sizes: [2]\nheads: [2]\nhead_dims: [8]\ndtypes: [float32]\ncausal: [false, true]\n"
            "passes: [backward, forward+backward]\n"
        ),
    )
    assert len(stored) == 12
    for record in stored:
        assert record["status"] == "ok", record["error"]
        gradients = record["check"]["gradients"]
        assert gradients["checked"] and gradients["rel_error"] < 1e-5, gradients
        # The backward pass sends K and V (float32, 32 rows; 16 for the spanning pattern) in its one
        # ring step, and the peer's dK and dV for them home after it (the ring's one hop); forward
        # passes send K and V once more.
        rows = 32 if record["implementation"] == "ring" else 16
        messages = 2 if record["pass"] == "backward" else 3
        assert record["comm"]["sent_bytes_per_call"] == messages * 2 * 2 * rows * 8 * 4


def test_copy_engine_transfers_named_or_by_default_fall_back_to_point_to_point_where_the_ranks_are_not_gpus_and_say_so(
    write_config,
):
    _, stored = run_sweep(
        write_config,
        (
            "implementations:\n  - {name: ring, options: {zigzag: true}}\n"
            "  - {name: usp, options: {ulysses_degree: 2, transfers: copy-engine, zigzag: true}}\n"
            "seq_lens: [64]\nworld_sizes: [2, 4]\nheads: [2]\nhead_dims: [8]\ndtypes: [float32]\ncausal: [true]\n"
            "passes: [forward, forward+backward]\n"
        ),
    )
    # ring at 2 and 4 processes, usp 2 × 2 at 4 (at 2 processes, degree 2 leaves no ring to carry).
    assert (
        sorted((r["implementation"], r["world_size"]) for r in stored)
        == [("ring", 2)] * 2 + [("ring", 4)] * 2 + [("usp", 4)] * 2
    )
    for record in stored:
        assert_matches_the_reference_on_every_rank(record)
        assert record["facts"]["transfers"] == "gloo: the ranks are not GPUs"


def test_eight_processes_forward_and_backward_match_the_reference(write_config):
    _, stored = run_sweep(
        write_config,
        (
            "implementations:\n  - {name: ring, options: {zigzag: true}}\n"
            "  - {name: ring-dilated, options: {segment_lengths: [16, 64], dilation_rates: [1, 2]}}\n"
            "seq_lens: [128]\nworld_sizes: [8]\nheads: [2]\nhead_dims: [8]\ndtypes: [float32]\ncausal: [true]\n"
            "passes: [forward+backward]\n"
        ),
    )
    assert len(stored) == 2
    for record in stored:
        assert record["world_size"] == 8 and record["status"] == "ok", record["error"]
        assert record["check"]["rel_error"] < 1e-5 and record["check"]["gradients"]["rel_error"] < 1e-5
        assert len(record["ranks"]) == 8


def test_ulysses_own_rows_first_plain_and_pipelined_at_two_and_four_processes_match_the_reference_and_send_what_they_must(
    write_config,
):
    _, stored = run_sweep(
        write_config,
        (
            "implementations:\n  - {name: ulysses, options: {own_rows_first: always}}\n"
            "  - {name: ulysses, options: {own_rows_first: never}}\n"
            "  - {name: ulysses, options: {chunks: 2, own_rows_first: never}}\n"
            "  - {name: ulysses, options: {chunks: 4, own_rows_first: never}}\n"
            "seq_lens: [64]\nworld_sizes: [1, 2, 3, 4]\nbatch_sizes: [2]\nheads: [8]\nhead_dims: [8]\n"
            "dtypes: [float32]\ncausal: [false, true]\npasses: [forward, forward+backward]\n"
        ),
    )
    # One process is sdpa, three do not divide 8 heads (or 64 tokens), and 4 chunks of heads over
    # four processes would need 16 heads: those cells are left out.
    assert sorted((r["world_size"], r["options"]["chunks"], r["options"]["own_rows_first"]) for r in stored) == sorted(
        (world, chunks, first)
        for world, chunks in [(2, 1), (2, 2), (2, 4), (4, 1), (4, 2)]
        for first in (("always", "never") if chunks == 1 else ("never",))
        for _ in range(4)
    )
    for record in stored:
        assert_matches_the_reference_on_every_rank(record)
        processes = record["world_size"]
        # Each of q, k, v and the output, 2 batches × 8 heads × 64/P rows × 8 float32 per rank, sends
        # all but the 1/P that stays; backward passes send them again with the output gradient, and the
        # gradients back.
        tensor = 2 * 8 * 64 // processes * 8 * 4
        tensors = 4 if record["pass"] == "forward" else 12
        expected = tensors * tensor * (processes - 1) // processes
        assert [rank["sent_bytes_per_call"] for rank in record["comm"]["ranks"]] == [expected] * processes


def test_backward_in_parts_of_one_head_matches_the_reference(write_config, tmp_path, monkeypatch):
    shutil.copy(PLUGINS / "one_head_parts.py", tmp_path / "one_head_parts.py")
    # The plugin loads into this process too: its setting is undone after the test.
    monkeypatch.setattr(blocks, "BACKWARD_PART_ROWS", blocks.BACKWARD_PART_ROWS)
    _, stored = run_sweep(
        write_config,
        (
            "plugins: [one_head_parts]\nimplementations:\n  - ulysses\n"
            "  - {name: ulysses, options: {chunks: 2, own_rows_first: never}}\n"
            "  - {name: ring, options: {zigzag: true}}\n  - {name: usp, options: {ulysses_degree: 2}}\n"
            "  - {name: usp, options: {ulysses_degree: 4}}\n"
            "seq_lens: [64]\nworld_sizes: [2, 4]\nbatch_sizes: [2]\nheads: [8]\nhead_dims: [8]\n"
            "dtypes: [float32]\ncausal: [false, true]\npasses: [forward+backward]\n"
        ),
    )
    # A ulysses rank attends 4 or 2 heads (2 or 1 per chunk), a ring's every head, usp's 2×2 ring 4:
    # each backward goes in as many parts. usp's degree 4 needs four processes.
    assert len(stored) == 18
    for record in stored:
        assert_matches_the_reference_on_every_rank(record)


def test_usp_at_every_ulysses_degree_matches_the_reference_and_ring_and_ulysses(write_config):
    _, stored = run_sweep(
        write_config,
        (
            "implementations:\n  - ring\n  - {name: ulysses, options: {chunks: 1}}\n  - usp\n  - {name: usp, options: {ulysses_degree: 2}}\n"
            "  - {name: usp, options: {ulysses_degree: 4}}\n"
            "  - {name: usp, options: {ulysses_degree: 2, zigzag: true}}\n"
            "seq_lens: [64]\nworld_sizes: [2, 4]\nheads: [4]\nhead_dims: [8]\ndtypes: [float32]\n"
            "causal: [false, true]\npasses: [forward, forward+backward]\n"
        ),
    )
    usp = [r for r in stored if r["implementation"] == "usp"]
    # Degree 4 does not divide two processes: left out there.
    assert sorted((r["world_size"], r["options"]["ulysses_degree"], r["options"]["zigzag"]) for r in usp) == sorted(
        (world, degree, zigzag)
        for world, degree, zigzag in [(2, 1, False), (2, 2, False), (2, 2, True)]
        + [(4, 1, False), (4, 2, False), (4, 4, False), (4, 2, True)]
        for _ in range(4)
    )
    for record in stored:
        assert_matches_the_reference_on_every_rank(record)
    for record in usp:
        processes, degree = record["world_size"], record["options"]["ulysses_degree"]
        ring_size, forward = processes // degree, record["pass"] == "forward"
        # Per rank, 4 heads × 64/P rows × 8 float32 per tensor. Within a Ulysses group, q, k, v and
        # the output send all but their 1/u that stays (backward passes: their gradients too, and at
        # degree P, Ulysses alone, q, k, v, the output and its gradient once more); a ring
        # step sends K and V on H/u heads of the ring shard, as many rows, r − 1 times forward, and
        # backward r − 1 times more with their gradient sums r − 1 times (from the rank after their
        # owner round to it; float32 here, as every hop is); a ring of one sends nothing.
        tensor = 4 * 64 // processes * 8 * 4
        ulysses_part = (4 if forward else 8 if ring_size > 1 else 12) * tensor * (degree - 1) // degree
        ring_messages = 0 if ring_size == 1 else ring_size - 1 if forward else 3 * (ring_size - 1)
        ring_part = ring_messages * 2 * tensor
        assert [rank["sent_bytes_per_call"] for rank in record["comm"]["ranks"]] == [
            ulysses_part + ring_part
        ] * processes

    # The scaling model's traffic is what they sent: ring (degree 1), ulysses (degree P) and usp.
    for record in stored:
        degree = {"ring": 1, "ulysses": record["world_size"]}.get(record["implementation"])
        layout = model.Layout.of(
            degree or record["options"]["ulysses_degree"], record["world_size"], 64, model.Shape(1, 4, 8, 4)
        )
        assert record["comm"]["sent_bytes_per_call"] == layout.sent_bytes(record["pass"])

    def errors(name, degree):
        return {
            (r["world_size"], r["causal"], r["pass"]): (
                r["check"]["max_abs_error"],
                (r["check"].get("gradients") or {}).get("rel_error"),
            )
            for r in stored
            if r["implementation"] == name
            and r["options"].get("ulysses_degree") == degree
            and not r["options"].get("zigzag")
        }

    # Degree 1 is ring across processes: the same blocks, merged in the same order, so the same outputs
    # and gradients.
    assert len(errors("ring", None)) == 8 and errors("usp", 1) == errors("ring", None)
    # Degree P is Ulysses (its blocked kernel in place of SDPA): within float32 rounding of it.
    for (world, causal, pass_name), (error, _) in errors("ulysses", None).items():
        assert abs(errors("usp", world)[world, causal, pass_name][0] - error) < 1e-6


def test_no_rank_makes_or_holds_a_whole_input(write_config, monkeypatch, tmp_path):
    """Every distributed implementation runs on the rows its rank holds: no rank asks for more rows of
    any input than its share, nor for a whole input, and (at four processes) no operation on a rank,
    the float64 check included, produces a tensor larger than its shard of K and V together."""
    shutil.copy(PLUGINS / "shard_watch.py", tmp_path / "shard_watch.py")
    watch = tmp_path / "watch"
    watch.mkdir()
    monkeypatch.setenv("RINGBENCH_SHARD_WATCH", str(watch))
    batch, heads, seq_len, head_dim = 1, 8, 64, 32
    _, stored = run_sweep(
        write_config,
        (
            "plugins: [shard_watch]\nimplementations:\n  - ring\n  - {name: ring, options: {zigzag: true}}\n"
            "  - {name: ring-dilated, options: {segment_lengths: [16, 64], dilation_rates: [1, 2]}}\n"
            "  - ulysses\n  - {name: usp, options: {ulysses_degree: 2}}\n"
            f"seq_lens: [{seq_len}]\nworld_sizes: [2, 4]\nheads: [{heads}]\nhead_dims: [{head_dim}]\n"
            "dtypes: [float32]\ncausal: [true]\npasses: [forward+backward]\n"
        ),
    )
    assert len(stored) == 10 and all(r["status"] == "ok" for r in stored), [r["error"] for r in stored]
    for world_size in (2, 4):
        for rank in range(world_size):
            seen = json.loads((watch / f"world-{world_size}-rank-{rank}.json").read_text())
            assert seen["requests"] and not [r for r in seen["requests"] if r[0] == "everything"]
            assert max(rows for _, _, rows in seen["requests"]) <= batch * heads * seq_len // world_size
            if world_size == 4:
                assert seen["largest"] <= 3 * batch * heads * seq_len * head_dim // world_size, seen["largest_op"]


def test_ring_and_usp_gradients_in_bfloat16_over_three_and_four_processes_match_the_reference(write_config):
    # The plain PyTorch block returns float32 gradients for bf16 inputs: the sums' first hop travels
    # in them, and later hops in float32; a ring of three has both (usp 2 × 2 a ring of two).
    _, stored = run_sweep(
        write_config,
        (
            "implementations:\n  - {name: ring, options: {zigzag: true}}\n  - {name: usp, options: {ulysses_degree: 2}}\n"
            "seq_lens: [48]\nworld_sizes: [3, 4]\nheads: [4]\nhead_dims: [8]\ndtypes: [bfloat16]\ncausal: [true]\n"
            "passes: [forward+backward]\n"
        ),
    )
    ran = [record for record in stored if record["status"] != "skipped"]
    assert len(ran) == 3  # ring at 3 and 4 processes, usp 2 × 2 at 4 (at 3, degree 2 does not divide)
    for record in ran:
        assert record["status"] == "ok", record["error"]
        assert record["check"]["gradients"]["checked"] and record["check"]["gradients"]["rel_error"] < 3e-2
