from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from ringbench.cli import app
from ringbench.report import load_run
from ringbench.report.plots import figures

FIXTURE = Path(__file__).parent / "fixtures" / "run"


def lines_of(figure):
    (axes,) = figure.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def test_figures_plot_the_measured_cells():
    run = load_run(FIXTURE)
    drawn = figures(run.frame)
    assert list(drawn) == ["time", "memory", "throughput", "efficiency"]
    time_lines = lines_of(drawn["time"])
    assert time_lines["sdpa backend=flash"] == ([4096, 6144, 8192], [0.11, 0.23, 0.42])
    assert time_lines["standard"] == ([4096, 6144], [1.22, 2.72])  # the OOM cell has no point
    assert time_lines["ring (2 processes)"] == ([8192], [0.26])
    (axes,) = drawn["time"].axes
    assert axes.get_xscale() == "log" and axes.get_yscale() == "log" and axes.get_xlabel() == "sequence length (tokens)"
    # One legend for the figure, below the panels, each series once.
    (legend,) = drawn["time"].legends
    assert [text.get_text() for text in legend.get_texts()] == list(time_lines)
    memory = lines_of(drawn["memory"])
    assert memory["standard"] == ([4096, 6144], [524.0, 1170.0])  # held inputs + peak
    # The one-device ring as one of its ranks holds it: its share's held buffers + peak, from the projection.
    ring = run.frame[(run.frame["label"] == "ring") & (run.frame["ring_size"] == 1) & (run.frame["world_size"] == 1)]
    assert memory["ring (ring 1)"][1] == list(ring.sort_values("seq_len")["projected_total_mib"].dropna())
    efficiency = lines_of(drawn["efficiency"])
    assert list(efficiency) == ["ideal: single-device sdpa's rate", "ring S=8192", "torch-cp backend=flash S=8192"]
    processes, ratios = efficiency["ring S=8192"]
    assert processes == [2] and round(ratios[0], 3) == 0.808  # 264.3 TFLOP/s per device against sdpa's 327.2
    assert efficiency["ideal: single-device sdpa's rate"][1] == [1.0, 1.0]


def test_figures_have_a_panel_per_shape():
    frame = load_run(FIXTURE).frame
    causal = frame.assign(causal=True, cell_id=frame["cell_id"] + "c")
    drawn = figures(pd.concat([frame, causal], ignore_index=True))
    titles = [axes.get_title() for axes in drawn["time"].axes]
    assert titles == ["forward · float16 · non-causal · B=1 H=8 D=64", "forward · float16 · causal · B=1 H=8 D=64"]


def test_cpu_runs_have_no_memory_figure_and_no_plots_skips_them(write_config):
    path = write_config()
    out = path.parent / "out"
    assert CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)]).exit_code == 0
    (run_dir,) = out.iterdir()
    assert list(figures(load_run(run_dir).frame)) == ["time", "throughput"]
    assert CliRunner().invoke(app, ["report", str(run_dir), "-q", "--no-plots"]).exit_code == 0
    assert not list(run_dir.glob("*.png")) and "## Plots" not in (run_dir / "report.md").read_text()
    assert CliRunner().invoke(app, ["report", str(run_dir), "-q"]).exit_code == 0
    assert sorted(p.name for p in run_dir.glob("*.png")) == ["throughput.png", "time.png"]
    assert "![time](time.png)" in (run_dir / "report.md").read_text()
