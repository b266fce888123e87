import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import BASE_CONFIG, measure

from ringbench import records
from ringbench.errors import ConfigError
from ringbench.run import env, supervisor, worker
from ringbench.schema import Failure
from ringbench.sweep import config, plan


class Recorder:
    def __init__(self):
        self.events = []

    def started(self, run_dir, total):
        self.events.append(("started", total))

    def cell_started(self, index, cell):
        self.events.append(("cell", index))

    def cell_finished(self, index, cell, record):
        self.events.append(("done", index, record.status))


def run_config(path, output_root):
    sweep, the_plan = plan.load(path)
    observer = Recorder()
    result = supervisor.run(sweep, the_plan, str(path), torch.device("cpu"), observer, output_root)
    return the_plan, result, observer


def test_failures_become_records_and_the_sweep_goes_on(write_config, tmp_path):
    text = BASE_CONFIG.replace("  - name: standard\n", "  - name: test-oom\n  - name: test-error\n  - name: standard\n")
    the_plan, result, observer = run_config(write_config(text + "plugins: [fake_impls]\n"), tmp_path / "out")
    stored = list(records.read_records(result.run_dir))
    assert stored == result.records and len(stored) == len(the_plan.cells) == 8
    by_impl = {}
    for record in stored:
        by_impl.setdefault(record.implementation, []).append(record)
    assert {r.status for r in by_impl["test-oom"]} == {"oom"}
    assert by_impl["test-oom"][0].error == Failure(
        "OutOfMemoryError", "CUDA out of memory. Tried to allocate 1024.00 GiB"
    )
    assert {r.status for r in by_impl["test-error"]} == {"error"}
    assert by_impl["test-error"][0].error == Failure("ValueError", "bad | input\nsecond line")
    for record in by_impl["standard"] + by_impl["sdpa"]:
        assert record.status == "ok" and record.error is None
        assert len(record.samples_ms) == record.stats.n >= 2 and record.warmup_ms
        # CPU: no memory is measured, so none is invented; the inputs' size is exact.
        assert record.memory.peak_allocated_mib is None and record.memory.peak_reserved_mib is None
        assert record.memory.inputs_mib == 3 * 2 * record.seq_len * 16 * 4 / 2**20
        assert record.tokens_per_s == record.seq_len / (record.stats.median_ms / 1e3)
    assert observer.events[0] == ("started", 8) and observer.events[-1] == ("done", 7, "ok")
    assert [r.cell_id for r in stored] == [c.id for c in the_plan.cells]


def test_run_file_stamps_environment_config_and_plan(write_config, tmp_path):
    text = BASE_CONFIG.replace("  - name: standard\n", "  - name: test-ring\n")
    path = write_config(text + "ring_sizes: [1, 5]\nplugins: [fake_impls]\n")
    the_plan, result, _ = run_config(path, tmp_path / "out")
    meta = json.loads((result.run_dir / records.RUN_FILE).read_text())
    assert meta["schema_version"] == records.SCHEMA_VERSION
    assert meta["config"] == config.load(path).as_dict() and meta["config_hash"] == config.load(path).hash
    assert [p["cell_id"] for p in meta["planned"]] == [c.id for c in the_plan.cells]
    assert [e["reason"] for e in meta["excluded"]] == [
        "seq_len 64 is not divisible by ring_size 5",
        "seq_len 96 is not divisible by ring_size 5",
    ]
    environment = meta["environment"]
    assert environment["device"] == "cpu" and environment["gpus"] == [] and environment["torch"] == torch.__version__
    # CPU runs get plain fallbacks for every GPU probe, never a crash.
    assert environment["gpu_state"] == [] and environment["gpu_state_end"] == [] and environment["driver"] is None
    assert environment["foreign_processes"] is None and environment["topology"] is None
    assert environment["matmul_peak_tflops"] == {}
    assert set(environment["git"]) == {"commit", "dirty"}
    assert result.run_dir.parent == tmp_path / "out"
    assert all(
        json.loads(line)["schema_version"] == records.SCHEMA_VERSION
        for line in (result.run_dir / records.RECORDS_FILE).read_text().splitlines()
    )


def test_the_stamp_keeps_every_library_setting_the_environment_sets_and_nothing_else(monkeypatch):
    for name in [name for name in os.environ if name.startswith(env.LIBRARY_SETTING_PREFIXES)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TORCH_NCCL_HIGH_PRIORITY", "1")
    monkeypatch.setenv("NCCL_MAX_NCHANNELS", "4")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("RINGBENCH_UNRELATED", "x")
    stamp = env.snapshot(torch.device("cpu"), 1, Path(__file__).parent)
    assert stamp["library_settings"] == {
        "NCCL_MAX_NCHANNELS": "4",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TORCH_NCCL_HIGH_PRIORITY": "1",
    }


def test_git_state_is_unknown_outside_a_checkout(tmp_path):
    assert env.git_state(tmp_path) == {"commit": "unknown", "dirty": None}


def test_run_folders_are_never_reused(tmp_path):
    first = records.create_run_dir(tmp_path, "abcdef1234")
    second = records.create_run_dir(tmp_path, "abcdef1234")
    assert first != second and first.name.endswith("-abcdef12") and first.is_dir() and second.is_dir()


def test_devices_resolve_to_an_indexed_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert env.resolve_device("auto", "x.yaml") == torch.device("cuda", 0)
    assert env.resolve_device("cuda", "x.yaml") == torch.device("cuda", 0)
    assert env.resolve_device("cuda:1", "x.yaml") == torch.device("cuda", 1)
    assert env.resolve_device("cpu", "x.yaml") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^x.yaml: device: 'cuda:2' requested but only 2 CUDA device\(s\) exist$"):
        env.resolve_device("cuda:2", "x.yaml")


def test_inputs_larger_than_the_device_are_skipped_before_allocating(monkeypatch):
    from ringbench.run import pipeline
    from ringbench.vocabulary import Cell

    class Properties:
        total_memory = 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    cell = Cell("sdpa", (("backend", "auto"),), 2**20, None, 1, 16, 128, "bfloat16", False, "forward")
    skip = pipeline._inputs_too_large(cell, torch.device("cuda", 0))
    assert skip == {
        "status": "skipped",
        "error": Failure("Skipped", "q, k and v alone need 12,288 MiB; the device has 1,024 MiB"),
    }
    assert pipeline._inputs_too_large(dataclasses.replace(cell, seq_len=2**10), torch.device("cuda", 0)) is None


def test_the_oversized_skip_can_be_turned_off(write_config, monkeypatch):
    from ringbench.run import pipeline
    from ringbench.vocabulary import Cell

    skip = {"status": "skipped", "error": Failure("Skipped", "too large")}
    monkeypatch.setattr(pipeline, "_inputs_too_large", lambda cell, device: skip)
    cell = Cell("sdpa", (("backend", "auto"),), 32, None, 1, 2, 8, "float32", False, "forward")
    budget = config.TimingBudget(warmup_ms=1, rep_ms=2, min_reps=2, max_reps=3)
    assert measure(cell, torch.device("cpu"), budget, 0).status == "skipped"
    assert measure(cell, torch.device("cpu"), budget, 0, skip_oversized=False).status == "ok"
    assert config.load(write_config(BASE_CONFIG + "skip_oversized_inputs: false\n")).skip_oversized_inputs is False


def test_close_undoes_setup_and_a_failing_close_is_the_cells_error(write_config, tmp_path):
    # test-patching replaces F.scaled_dot_product_attention until its close(): sdpa after it is
    # right only if close() ran; a second test-patching cell refuses to start over a leaked patch.
    text = BASE_CONFIG.replace(
        "  - name: standard\n",
        "  - name: test-patching\n  - name: test-bad-close\n  - {name: test-patching, options: {tag: 1}}\n",
    )
    _, result, _ = run_config(write_config(text + "plugins: [fake_impls]\n"), tmp_path / "out")
    by_impl = {}
    for record in result.records:
        by_impl.setdefault((record.implementation, record.options.get("tag")), []).append(record)
    for key in [("test-patching", 0), ("test-patching", 1), ("sdpa", None)]:
        assert {r.status for r in by_impl[key]} == {"ok"}, by_impl[key][0].error
        assert all(r.check.rel_error < 1e-5 for r in by_impl[key])
    for record in by_impl[("test-bad-close", None)]:
        assert record.status == "error"
        assert record.error == Failure("RuntimeError", "could not undo the setup")


def test_a_dying_or_hanging_cell_costs_only_itself(write_config, tmp_path):
    # One worker runs the cells; a segfault, an os._exit and a hang each end theirs (the hang
    # by the cell timeout) and a fresh worker takes the rest. Allocation without bound is an OOM.
    text = BASE_CONFIG.replace(
        "  - name: standard\n", "  - name: standard\n  - test-segfault\n  - test-exit\n  - test-hang\n  - test-alloc\n"
    )
    path = write_config(
        text.replace("seq_lens: [64, 96]", "seq_lens: [64]") + "plugins: [fake_impls]\ncell_timeout_s: 8\n"
    )
    _, result, _ = run_config(path, tmp_path / "out")
    by_name = {record.implementation: record for record in result.records}
    assert [record.implementation for record in result.records] == [
        "standard",
        "test-segfault",
        "test-exit",
        "test-hang",
        "test-alloc",
        "sdpa",
    ]
    assert by_name["standard"].status == by_name["sdpa"].status == "ok"
    assert by_name["test-segfault"].status == "crashed"
    assert by_name["test-segfault"].error.message.startswith("the worker exited with code -11 during this cell")
    assert by_name["test-exit"].status == "crashed"
    assert by_name["test-exit"].error.message.startswith("the worker exited with code 7 during this cell")
    assert by_name["test-hang"].status == "timeout"
    assert by_name["test-hang"].error.message.startswith(
        "the cell ran past cell_timeout_s (8 s) and its worker was stopped; its output ended: "
    )
    assert by_name["test-alloc"].status == "oom" and "can't allocate memory" in by_name["test-alloc"].error.message
    # Start-up is paid once, and again only after each worker that died or was stopped.
    log = (result.run_dir / "worker-1.log").read_text()
    assert log.count("ringbench worker ") == 4
    assert not (result.run_dir / "inflight-1.json").exists()  # nothing is in flight once the sweep ends


def test_a_worker_that_stops_between_cells_blames_none_and_one_that_cannot_start_blames_one(
    write_config, tmp_path, monkeypatch
):
    path = write_config()
    # A stand-in worker that records the first pending cell, then exits: as a worker does after
    # a CUDA fault it has recorded. The runner must start another for each remaining cell.
    one_cell = (
        "import sys, json; from pathlib import Path; from ringbench import records; from ringbench.run import pipeline; from ringbench.vocabulary import Cell\n"
        "run_dir = Path(sys.argv[1]); meta = records.read_run(run_dir); done = {r.cell_id for r in records.done(run_dir, False)}\n"
        "cell = next(Cell(p['implementation'], tuple(sorted(p['options'].items())), p['seq_len'], p['ring_size'],\n"
        "  p['batch_size'], p['heads'], p['head_dim'], p['dtype'], p['causal'], p['pass'], p['world_size'])\n"
        "  for p in meta['planned'] if p['cell_id'] not in done)\n"
        "with records.RecordWriter(run_dir) as w: w.append(pipeline.make_record(cell, {'status': 'skipped'}))\n"
    )
    monkeypatch.setattr(
        worker, "command", lambda world_size, run_dir, pending, threads: [sys.executable, "-c", one_cell, str(run_dir)]
    )
    the_plan, result, _ = run_config(path, tmp_path / "out")
    assert [r.status for r in result.records] == ["skipped"] * len(the_plan.cells)
    assert [r.cell_id for r in result.records] == [c.id for c in the_plan.cells]
    # A worker that dies before any cell (here: at once) is blamed on the first pending cell, then the next...
    monkeypatch.setattr(
        worker, "command", lambda world_size, run_dir, pending, threads: [sys.executable, "-c", "raise SystemExit(3)"]
    )
    the_plan, result, _ = run_config(path, tmp_path / "out2")
    assert [r.status for r in result.records] == ["crashed"] * len(the_plan.cells)
    assert result.records[0].error.message.startswith("the worker exited with code 3 before starting this cell")


def test_workers_get_fixed_malloc_thresholds_unless_the_user_set_their_own(monkeypatch):
    from ringbench.run import env

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    workers = env.worker_environment()
    assert workers["MALLOC_MMAP_THRESHOLD_"] == "4096" and workers["MALLOC_TRIM_THRESHOLD_"] == str(2**40)
