"""Reports from stored runs. Reads JSON through pandas; never imports torch."""

from ringbench.report.load import find_runs, load_run
from ringbench.report.render import render_report

__all__ = ["find_runs", "load_run", "render_report"]
