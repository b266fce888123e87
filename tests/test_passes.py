import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import measure, registry_with_fakes

from ringbench import records
from ringbench.run import correctness, pipeline
from ringbench.run.distributed import OneProcess
from ringbench.schema import Modes
from ringbench.sweep import plan
from ringbench.sweep.config import TimingBudget
from ringbench.vocabulary import Cell

BUDGET = TimingBudget(warmup_ms=1, rep_ms=2, min_reps=3, max_reps=6, noise_target=100)
CPU = torch.device("cpu")


def run(name, pass_name, causal=False, seq_len=32):
    cell = Cell(
        name, (("backend", "auto"),) if name == "sdpa" else (), seq_len, None, 2, 2, 8, "float32", causal, pass_name
    )
    return measure(cell, CPU, BUDGET, 0)


@pytest.mark.parametrize("name", ["standard", "sdpa"])
@pytest.mark.parametrize("pass_name", ["backward", "forward+backward"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_float64_reference(name, pass_name, causal):
    record = run(name, pass_name, causal)
    assert record.status == records.OK, record.error
    gradients = record.check.gradients
    assert gradients.checked and max(getattr(gradients, f"d{x}_rel_error") for x in "qkv") < 1e-5
    factor = {"backward": 2.5, "forward+backward": 3.5}[pass_name]
    assert record.flops == factor * 4 * 2 * 2 * 32 * 32 * 8 / (2 if causal else 1)
    # standard models forward calls only; SDPA's fused kernels (flash on the CPU) model a forward+backward
    # call: the output, dq, dk, dv and a float32 dQ (6 tensors of 2·2·32·8 float32) and 2 float32 a row.
    fused = name == "sdpa" and pass_name == "forward+backward"
    assert record.memory.modelled_mib == ((6 * 4096 + 2 * 512) / 2**20 if fused else None)


def test_backward_time_holds_no_forward():
    registry_with_fakes()  # loads the plugin, under a name of ringbench's own (see Registry.load_plugins)
    fake = next(
        module
        for name, module in sys.modules.items()
        if name.startswith("ringbench_plugin_") and name.endswith("_fake_impls")
    )
    fake.forward_calls.clear()
    record = run("test-counting", "backward")
    # One forward for the check, one whose graph every timed backward reuses.
    assert len(fake.forward_calls) == 2 and record.stats.n >= 3
    fake.forward_calls.clear()
    record = run("test-counting", "forward+backward")
    assert len(fake.forward_calls) == 1 + len(record.warmup_ms) + len(record.samples_ms)


def test_wrong_gradients_make_the_cell_wrong():
    record = run("test-bad-grad", "backward")
    assert record.status == records.WRONG
    assert record.check.rel_error < 1e-5 and not record.check.gradients.passed
    assert record.check.gradients.dq_rel_error == pytest.approx(1.0)


def test_gradients_of_long_sequences_are_checked_on_a_sample(monkeypatch):
    monkeypatch.setattr(correctness, "GRADIENT_FULL_MAX_SEQ", 16)
    monkeypatch.setattr(correctness, "GRADIENT_SAMPLE_ROWS", 5)
    monkeypatch.setattr(correctness, "BLOCK_ELEMENTS", 7 * 32)  # blocks of 7 rows: the last one short
    right = run("standard", "backward").check.gradients
    assert right.checked and right.passed and right.rel_error < 1e-6
    assert (right.heads_checked, right.rows_checked) == (2, 5)
    wrong = run("test-bad-grad", "forward+backward")
    assert wrong.status == records.WRONG and wrong.check.gradients.dq_rel_error == pytest.approx(1.0)


def test_forward_only_implementations_are_left_out_of_backward_passes(write_config):
    path = write_config(
        "plugins: [fake_impls]\nimplementations: [test-wrong, sdpa]\nseq_lens: [32]\nheads: [1]\n"
        "head_dims: [8]\ndtypes: [float32]\npasses: [forward, backward]\n"
    )
    the_plan = plan.load(path)[1]
    assert [(c.implementation, c.pass_name) for c in the_plan.cells] == [
        ("test-wrong", "forward"),
        ("sdpa", "forward"),
        ("sdpa", "backward"),
    ]
    assert [e.reason for e in the_plan.excluded] == ["test-wrong supports only forward"]


def test_gpu_only_modes_say_why_they_are_off_on_the_cpu():
    budget = TimingBudget(
        warmup_ms=1, rep_ms=2, min_reps=2, max_reps=3, noise_target=100, cold_l2=True, cuda_graph="always"
    )
    cell = Cell("sdpa", (("backend", "auto"),), 32, None, 1, 2, 8, "float32", False, "forward")
    record = measure(cell, CPU, budget, 0)
    assert record.status == records.OK
    assert record.modes == Modes(
        cold_l2=False,
        cuda_graph=False,
        launch_ms=None,
        device_ms=None,
        calls_per_sample=1,
        notes=("cold L2 applies to GPUs only", "CUDA graphs need a CUDA device"),
    )
    assert record.plain is None
    # Left to decide (auto), the CPU has no graphs to choose and nothing to explain.
    auto = TimingBudget(warmup_ms=1, rep_ms=2, min_reps=2, max_reps=3, noise_target=100)
    assert measure(cell, CPU, auto, 0).modes.notes == ()


def test_ring_backward_leaves_out_the_efficient_kernel(write_config):
    path = write_config(
        "implementations:\n  - {name: ring, options: {kernel: efficient}}\n  - ring\nseq_lens: [32]\n"
        "heads: [1]\nhead_dims: [8]\ndtypes: [float32]\npasses: [forward, backward]\n"
    )
    the_plan = plan.load(path)[1]
    assert [(dict(c.options)["kernel"], c.pass_name) for c in the_plan.cells] == [
        ("efficient", "forward"),
        ("auto", "forward"),
        ("auto", "backward"),
    ]
    assert [e.reason for e in the_plan.excluded] == ["ring's backward runs on flash, cudnn, math blocks, not efficient"]


def _modes_with(monkeypatch, host_ms, device_ms, budget=None, across_processes=False):
    """The timing modes _modes picks on a (pretended) GPU whose probe reads these times."""
    from ringbench.run.timing import Launch

    probed = []

    def launch_and_work(fn, device, agree=None):
        probed.append(agree)
        return Launch(host_ms, device_ms)

    monkeypatch.setattr(pipeline, "launch_and_work", launch_and_work)
    monkeypatch.setattr(pipeline, "graph_replay", lambda fn, device: ((lambda: "replayed"), None))
    budget = budget or TimingBudget()
    device = torch.device("cuda")
    group = SimpleNamespace(world_size=2, max=max) if across_processes else OneProcess(device)
    timed, _, modes = pipeline._modes(lambda: "plain", device, budget, group)
    # Across processes the probe agrees through the group (every rank probing at once).
    assert probed == ([group.max] if across_processes else [None] if probed else [])
    return timed(), modes


def test_auto_timing_replays_a_graph_where_the_launch_outweighs_half_the_gpu_work(monkeypatch):
    assert _modes_with(monkeypatch, host_ms=0.6, device_ms=1.0) == (
        "replayed",
        {"cold_l2": False, "cuda_graph": True, "launch_ms": 0.6, "device_ms": 1.0, "notes": []},
    )
    timed, modes = _modes_with(monkeypatch, host_ms=0.4, device_ms=1.0)
    assert timed == "plain" and not modes["cuda_graph"] and modes["launch_ms"] == 0.4
    assert _modes_with(monkeypatch, 0.1, 1.0, TimingBudget(cuda_graph="always"))[0] == "replayed"
    timed, modes = _modes_with(monkeypatch, 9.0, 1.0, TimingBudget(cuda_graph="never"))
    assert timed == "plain" and modes["launch_ms"] is None and modes["notes"] == []
    timed, modes = _modes_with(monkeypatch, 9.0, 1.0, across_processes=True)
    assert timed == "plain" and modes["notes"] == ["CUDA graphs are not used across processes: plain calls timed"]
    assert (modes["launch_ms"], modes["device_ms"]) == (9.0, 1.0)  # the host's share is measured all the same


def test_a_refused_capture_is_timed_plainly_and_says_why(monkeypatch):
    from ringbench.run.timing import Launch

    monkeypatch.setattr(pipeline, "launch_and_work", lambda fn, device: Launch(5.0, 1.0))
    monkeypatch.setattr(
        pipeline, "graph_replay", lambda fn, device: (fn, "capture failed, plain calls timed instead: X")
    )
    device = torch.device("cuda")
    timed, _, modes = pipeline._modes(lambda: "plain", device, TimingBudget(), OneProcess(device))
    assert timed() == "plain" and not modes["cuda_graph"]
    assert modes["notes"] == ["capture failed, plain calls timed instead: X"]
