"""Predictions made before a run: the scaling model applied to a sweep's planned cells, kept in the
run's folder, and set beside the measurements in its report."""

import json
import shutil

import pytest
from test_scaling import CALIBRATION, FIXTURES, beside, step_transfer_ms
from typer.testing import CliRunner

from ringbench import records
from ringbench.cli import app
from ringbench.report import predictions
from ringbench.report.load import load_run
from ringbench.report.render import render_report
from ringbench.vocabulary import Cell

runner = CliRunner()
# The fixture's shape and kernel, on 2, 4 and 8 processes: the model's strategies and one it leaves out.
CONFIG = """\
name: predicted
device: cuda
implementations:
  - {name: sdpa, options: {backend: cudnn}}
  - {name: ring, options: {kernel: cudnn, zigzag: true}}
  - {name: ulysses, options: {backend: cudnn}}
  - {name: torch-cp, options: {backend: cudnn}}
seq_lens: [131072]
world_sizes: [1, 4, 8]
heads: [16]
head_dims: [128]
dtypes: [bfloat16]
causal: [false]
passes: [forward]
"""
RING_PEAK_MS = 228.00193786621094  # the fixture's single-GPU sdpa, forward, non-causal, 128K


def calibrated_fixture(tmp_path):
    run = tmp_path / "measured"
    shutil.copytree(FIXTURES / "multi-process", run)
    records.write_calibration(run, CALIBRATION)
    return run


def predict(tmp_path, *extra):
    config = tmp_path / "predicted.yaml"
    config.write_text(CONFIG)
    result = runner.invoke(app, ["predict", str(config), str(calibrated_fixture(tmp_path)), *extra])
    return config, result


def test_predict_models_each_multi_process_cell_from_the_runs_single_gpu_cells_and_links(tmp_path):
    output = tmp_path / "predictions.json"
    config, result = predict(tmp_path, "-o", str(output))
    assert result.exit_code == 0, result.output
    stored = records.read_predictions(output)
    assert stored["sources"] == ["measured"] and stored["calibrated_world_sizes"] == [4]
    by_title = {cell["title"]: cell for cell in stored["cells"].values()}
    # Ring on four processes, forward, by hand as in test_scaling: a 32K block at the 128K cell's rate
    # (10% slower while its transfer runs), four steps, three merges of 1 ms.
    block = RING_PEAK_MS / 16
    ring = by_title["ring kernel=cudnn zigzag=true S=131072 4 processes B=1 H=16 D=128 bfloat16 forward"]
    assert ring["ms"] == pytest.approx(3 * beside(block, step_transfer_ms(32768)) + block + 3.0, rel=1e-12)
    assert ring["efficiency"] == pytest.approx(RING_PEAK_MS / (4 * ring["ms"]), rel=1e-12)
    assert ring["extrapolated"] and not ring["exposed"]
    # Eight processes: on the links calibrated at four, in one node of eight; a 16K block.
    eight = by_title["ring kernel=cudnn zigzag=true S=131072 8 processes B=1 H=16 D=128 bfloat16 forward"]
    block = RING_PEAK_MS / 64
    assert eight["ms"] == pytest.approx(7 * beside(block, step_transfer_ms(16384)) + block + 7 * 0.5, rel=1e-12)
    assert sorted(cell["world_size"] for cell in stored["cells"].values()) == [4, 4, 8, 8]  # none of one process
    assert [entry["reason"] for entry in stored["left_out"]] == [
        "the model covers ring (zigzag where causal), ulysses and usp"
    ] * 2
    assert (
        "| ring kernel=cudnn zigzag=true | 4           | 131072    | forward | no       | 60.41 |               0.944‡ |\n"
    ) in result.output
    assert "- the model covers ring (zigzag where causal), ulysses and usp (2×)" in result.output


def test_predicting_from_runs_without_calibration_is_a_one_line_error(tmp_path):
    config = tmp_path / "predicted.yaml"
    config.write_text(CONFIG)
    result = runner.invoke(app, ["predict", str(config), str(FIXTURES / "multi-process")])
    assert result.exit_code == 2
    assert result.output == (
        f"{FIXTURES / 'multi-process'}: no calibration.json; a run of several processes on a GPU measures its links\n"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": 9}, "schema_version: expected 1, got 9 (write it with ringbench predict)"),
        ({"made_at": "yesterday"}, "made_at: expected an ISO date and time with its UTC offset, got 'yesterday'"),
        (
            {"made_at": "2026-11-29T05:00:00"},
            "made_at: expected an ISO date and time with its UTC offset, got '2026-11-29T05:00:00'",
        ),
        ({"sources": []}, "sources: expected the names of the runs predicted from"),
    ],
)
def test_a_broken_predictions_file_names_its_field(tmp_path, change, message):
    output = tmp_path / "predictions.json"
    predict(tmp_path, "-o", str(output))
    stored = json.loads(output.read_text()) | change
    output.write_text(json.dumps(stored))
    result = runner.invoke(app, ["run", str(tmp_path / "predicted.yaml"), "--predictions", str(output)])
    assert result.exit_code == 2 and result.output == f"{output}: {message}\n"


def test_a_broken_prediction_names_its_cell(tmp_path):
    output = tmp_path / "predictions.json"
    predict(tmp_path, "-o", str(output))
    stored = json.loads(output.read_text())
    cell_id = next(iter(stored["cells"]))
    stored["cells"][cell_id]["efficiency"] = -1
    output.write_text(json.dumps(stored))
    with pytest.raises(records.BrokenRun, match=f"cells.{cell_id}.efficiency: expected a positive number, got -1"):
        records.read_predictions(output)


def kept_prediction(tmp_path, prediction):
    """The calibrated fixture, keeping ``prediction`` for its four-process ring forward (as made
    2026-11-25 16:30 UTC from a run named earlier)."""
    run = calibrated_fixture(tmp_path)
    (ring,) = (
        cell["cell_id"]
        for cell in json.loads((run / "run.json").read_text())["planned"]
        if (cell["implementation"], cell["world_size"], cell["pass"], cell["causal"]) == ("ring", 4, "forward", False)
    )
    records.write_json_atomic(
        run / records.PREDICTIONS_FILE,
        {
            "schema_version": 1,
            "made_at": "2026-11-25T16:30:00+00:00",
            "sources": ["earlier"],
            "cells": {ring: prediction},
        },
    )
    return run


def test_the_report_sets_the_predictions_a_run_kept_beside_its_measurements(tmp_path):
    loaded = load_run(kept_prediction(tmp_path, {"ms": 70.0, "efficiency": 0.85}))
    assert loaded.warnings == []
    report = render_report([loaded])
    # The fixture's run began 2026-11-26T04:01:58Z; the ring cell measured 0.893 (test_scaling's golden).
    assert (
        "- Its predictions (made 2026-11-25 16:30 UTC from earlier, 11.5 h before the run began; 1 of its 1 "
        "cells in this run) within 5% in 1 of 1 cells (largest error 4.8%)\n"
    ) in report
    assert "| 0.893      | 0.944‡  | +5.6%   | 0.850              | -4.8%       |" in report


def test_a_predictions_file_the_report_cannot_read_is_a_warning_and_the_cells_stand(tmp_path):
    run = calibrated_fixture(tmp_path)
    (run / records.PREDICTIONS_FILE).write_text("{")
    loaded = load_run(run)
    assert loaded.warnings == [
        f"{run / records.PREDICTIONS_FILE}: cannot read it (JSONDecodeError: Expecting property name enc...es: "
        "line 1 column 2 (char 1)); the predictions are left out"
    ]
    assert len(loaded.frame) == 24 and "predicted before" not in render_report([loaded])


def test_run_refuses_predictions_for_another_sweep_or_with_resume(tmp_path, write_config):
    output = tmp_path / "predictions.json"
    predict(tmp_path, "-o", str(output))
    other = write_config()
    result = runner.invoke(app, ["run", str(other), "--predictions", str(output)])
    assert result.exit_code == 2
    assert (
        result.output == f"{output}: predicts none of the cells of {other} (made for {tmp_path / 'predicted.yaml'})\n"
    )
    resumed = runner.invoke(
        app, ["run", "--resume", str(calibrated_fixture(tmp_path / "r")), "--predictions", str(output)]
    )
    assert resumed.exit_code == 2
    assert resumed.output == "--predictions goes with a new run; a resumed run keeps the predictions it started with\n"


def test_predictions_made_from_one_run_are_kept_by_the_next_and_reported_beside_it(write_config, tmp_path):
    """On the CPU, end to end: a run of one and two processes, predictions from it, a second run keeping them."""
    config = write_config(
        "implementations:\n  - {name: sdpa, options: {backend: math}}\n"
        "  - {name: ring, options: {kernel: math, zigzag: true}}\n"
        "seq_lens: [64]\nworld_sizes: [1, 2]\nheads: [2]\nhead_dims: [8]\ndtypes: [float32]\ncausal: [false]\n"
        "timing: {warmup_ms: 1, rep_ms: 2, min_reps: 2, max_reps: 3}\n"
    )

    def run(*extra):
        out = tmp_path / f"out{len(extra)}"
        result = runner.invoke(app, ["run", str(config), "--output-root", str(out), *extra])
        assert result.exit_code == 0, result.output
        (run_dir,) = out.iterdir()
        return run_dir

    first = run()
    output = tmp_path / "predictions.json"
    assert runner.invoke(app, ["predict", str(config), str(first), "-o", str(output)]).exit_code == 0
    second = run("--predictions", str(output))
    assert json.loads((second / records.PREDICTIONS_FILE).read_text()) == json.loads(output.read_text())
    (predicted,) = json.loads(output.read_text())["cells"].values()
    report = render_report([load_run(second)])
    assert (
        f"from {first.name}, " in report
        and " before the run began; 1 of its 1 cells in this run) within 5% in " in report
    )
    assert f"| {predicted['efficiency']:.3f} " in report


def test_a_sweep_with_nothing_to_predict_is_a_one_line_error_saying_why(tmp_path):
    config = tmp_path / "predicted.yaml"
    config.write_text(
        CONFIG.replace("  - {name: ring, options: {kernel: cudnn, zigzag: true}}\n", "").replace(
            "  - {name: ulysses, options: {backend: cudnn}}\n", "  - {name: ulysses, options: {backend: auto}}\n"
        )
    )
    result = runner.invoke(app, ["predict", str(config), str(calibrated_fixture(tmp_path))])
    assert result.exit_code == 2
    assert result.output == (
        f"{config}: no cell to predict: its kernel is chosen when it runs (auto), and no cell of the runs like it "
        "says which (2×); "
        "the model covers ring (zigzag where causal), ulysses and usp (2×)\n"
    )


def test_predicting_from_runs_on_different_gpus_is_a_one_line_error(tmp_path):
    h200 = calibrated_fixture(tmp_path)
    h100 = calibrated_fixture(tmp_path / "other")
    meta = json.loads((h100 / "run.json").read_text())
    for gpu in meta["environment"]["gpus"]:
        gpu["name"] = "NVIDIA H100 80GB HBM3"
    (h100 / "run.json").write_text(json.dumps(meta))
    config = tmp_path / "predicted.yaml"
    config.write_text(CONFIG)
    result = runner.invoke(app, ["predict", str(config), str(h200), str(h100)])
    assert result.exit_code == 2
    assert result.output == (
        f"{h200}, {h100}: measured on different devices (NVIDIA H100 80GB HBM3, NVIDIA H200); predict from one\n"
    )


def test_a_kernel_left_to_auto_is_the_one_the_runs_cells_like_it_ran(tmp_path):
    run_dir = calibrated_fixture(tmp_path)
    stored = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    for record in stored:
        if record["implementation"] == "ring":
            record["options"]["kernel"] = "auto"  # recorded as a config leaving it to ring; cuDNN ran
    (run_dir / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in stored))
    ring = Cell(
        "ring",
        (("kernel", "auto"), ("transfers", "nccl"), ("zigzag", True)),
        131072,
        4,
        1,
        16,
        128,
        "bfloat16",
        False,
        "forward",
        world_size=4,
    )
    payload = predictions.make([ring], [load_run(run_dir)], "auto.yaml")
    # As ring kernel=cudnn is predicted from the same runs (the first test).
    block = RING_PEAK_MS / 16
    assert payload["cells"][ring.id]["ms"] == pytest.approx(3 * beside(block, step_transfer_ms(32768)) + block + 3.0)


def test_copy_engine_cells_are_predicted_only_from_a_calibration_that_measured_their_transfers(tmp_path):
    config = tmp_path / "predicted.yaml"
    config.write_text(CONFIG.replace("zigzag: true}", "zigzag: true, transfers: copy-engine}"))
    result = runner.invoke(app, ["predict", str(config), str(calibrated_fixture(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "- the runs' calibration measured no copy-engine transfers (2×)" in result.output


def test_a_cell_an_earlier_run_found_host_paced_is_predicted_at_the_hosts_pace_and_marked(tmp_path):
    run = calibrated_fixture(tmp_path)
    lines = (run / "records.jsonl").read_text().splitlines()
    four = next(
        index
        for index, line in enumerate(lines)
        if (lambda r: (r["implementation"], r["world_size"], r["pass"], r["causal"]))(json.loads(line))
        == ("ring", 4, "forward", False)
    )
    record = json.loads(lines[four])
    # The host's launch, over the 60.41 ms the model gives its GPUs (and the 63.8 the cell measured).
    record["modes"] |= {"launch_ms": 100.0, "device_ms": 63.8}
    lines[four] = json.dumps(record)
    (run / "records.jsonl").write_text("\n".join(lines) + "\n")
    config, output = tmp_path / "predicted.yaml", tmp_path / "predictions.json"
    config.write_text(CONFIG)
    result = runner.invoke(app, ["predict", str(config), str(run), "-o", str(output)])
    assert result.exit_code == 0, result.output
    cells = records.read_predictions(output)["cells"]
    (ring,) = (cell for cell in cells.values() if cell["title"].startswith("ring") and cell["world_size"] == 4)
    assert ring["host_paced"] and ring["ms"] == 100.0
    assert ring["efficiency"] == pytest.approx(RING_PEAK_MS / (4 * 100.0), rel=1e-12)
    # The eight-process cells no run measured: at their GPUs' pace.
    assert [cell["host_paced"] for cell in cells.values() if cell["world_size"] == 8] == [False, False]
    assert (
        "| ring kernel=cudnn zigzag=true | 4           | 131072    | forward | no       | 100.00 |              0.570‡§ |\n"
    ) in result.output
    assert (
        "§: an earlier run of the cell found the host slower to launch the call than the modelled GPU time, so "
        "it is predicted at the host's pace."
    ) in result.output


def test_the_report_marks_a_prediction_made_at_the_hosts_pace(tmp_path):
    run = kept_prediction(tmp_path, {"ms": 100.0, "efficiency": 0.57, "host_paced": True})
    report = render_report([load_run(run)])
    assert "| 0.893      | 0.944‡  | +5.6%   | 0.570§             | -36.2%      |" in report
    assert (
        "§ on a prediction: an earlier run of the cell found the host slower to launch the call than the "
        "modelled GPU time, so it is predicted at the host's pace."
    ) in report
