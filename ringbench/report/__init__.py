"""Reports from stored runs. Reads JSON through pandas; never imports torch."""

from ringbench.report import index
from ringbench.report.html import to_html
from ringbench.report.load import find_runs, load_run
from ringbench.report.render import render_merged, render_report, render_table

__all__ = ["find_runs", "index", "load_run", "render_merged", "render_report", "render_table", "to_html"]
