from pathlib import Path

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
    assert list(drawn) == ["time", "memory", "throughput", "scaling"]
    time_lines = lines_of(drawn["time"])
    assert time_lines["sdpa backend=flash"] == ([4096, 6144, 8192], [0.11, 0.23, 0.42])
    assert time_lines["standard"] == ([4096, 6144], [1.22, 2.72])  # the OOM cell has no point
    assert time_lines["ring (2 processes)"] == ([8192], [0.26])
    (axes,) = drawn["time"].axes
    assert axes.get_xscale() == "log" and axes.get_yscale() == "log" and axes.get_xlabel() == "sequence length (tokens)"
    assert lines_of(drawn["memory"])["standard"] == ([4096, 6144], [524.0, 1170.0])  # held inputs + peak
    scaling = lines_of(drawn["scaling"])
    assert list(scaling) == ["ring S=8192", "torch-cp backend=flash S=8192"]
    assert scaling["ring S=8192"][0] == [1, 2]  # torch-cp has no one-process cell: one point at 2


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
