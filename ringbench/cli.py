"""The command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from ringbench.errors import UserError
from ringbench.vocabulary import counted

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Benchmark attention implementations for long context.",
)
EXIT_USAGE = 2


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print a user's mistake as one line on stderr and exit 2, without a traceback."""
    try:
        yield
    except UserError as exc:
        print(exc, file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


def _load(config_path: Path):
    """The sweep, its plan and its device, checked alike for ``plan`` and ``run``: a device that is
    not there, or a plan without a cell, is the config's error."""
    from collections import Counter

    from ringbench.run import env
    from ringbench.sweep import plan

    sweep, the_plan = plan.load(config_path)
    device = env.resolve_device(sweep.device, str(config_path))
    if not the_plan.cells and not the_plan.searches:
        reasons = Counter(exclusion.reason for exclusion in the_plan.excluded).most_common()
        listed = "; ".join(f"{reason} ({count}×)" for reason, count in reasons[:3])
        more = f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
        raise UserError(f"{config_path}: no cell to run, every combination is left out: {listed}{more}")
    return sweep, the_plan, device


def _version(value: bool) -> None:
    if value:
        from ringbench import __version__
        from ringbench.run.env import ringbench_source

        source = ringbench_source()
        commit = f" (commit {source['commit'][:12]}{', dirty' if source['dirty'] else ''})" if source["commit"] else ""
        print(f"ringbench {__version__}{commit}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="print ringbench's version (and commit, from a checkout) and exit",
    ),
) -> None:
    """Benchmark attention implementations for long context."""


def _print_plan(source: Path, the_plan) -> None:
    kinds = [counted(len(the_plan.cells), "cell")] if the_plan.cells or not the_plan.searches else []
    if the_plan.searches:
        kinds.append(counted(len(the_plan.searches), "search", "searches"))
    print(f"{source}: {' and '.join(kinds)} planned, {len(the_plan.excluded)} left out")
    for item in [*the_plan.cells, *the_plan.searches]:
        print(f"  {item.id}  {item.title}")
    if the_plan.excluded:
        print("left out:")
        for exclusion in the_plan.excluded:
            print(f"  {exclusion.cell.title}: {exclusion.reason}")


@app.command()
def plan(config: Path = typer.Argument(..., help="sweep YAML")) -> None:
    """List the cells a config would run, and what it leaves out, without running anything."""
    with _user_errors():
        _, the_plan, _ = _load(config)
    _print_plan(config, the_plan)


def _predictions(path: Path | None, resume: Path | None) -> dict | None:
    """The predictions file ``run --predictions`` names, read and checked field by field."""
    from ringbench import records

    if path is None:
        return None
    if resume is not None:
        raise UserError("--predictions goes with a new run; a resumed run keeps the predictions it started with")
    return records.read_predictions(path)


def _check_predicts(predicted: dict | None, path: Path | None, the_plan, config: Path) -> None:
    """Refuse predictions made for another sweep: they would be kept and set beside nothing."""
    if predicted is not None and not set(predicted["cells"]) & {cell.id for cell in the_plan.cells}:
        raise UserError(f"{path}: predicts none of the cells of {config} (made for {predicted.get('config')})")


@app.command()
def run(
    config: Path | None = typer.Argument(None, help="sweep YAML (with --resume: the run's own, by default)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and stop"),
    output_root: Path | None = typer.Option(None, "--output-root", help="overrides the config's output_root"),
    resume: Path | None = typer.Option(None, "--resume", help="run folder of a stopped run: run what it lacks"),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="with --resume: also re-run oom/error/crashed cells"
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch intra-op threads (overrides the config; default: physical cores)"
    ),
    predictions: Path | None = typer.Option(
        None, "--predictions", help="ringbench predict's file, kept in the run folder: the report sets it beside"
    ),
) -> None:
    """Run a sweep: every cell timed, memory-measured and recorded under the output root."""
    from ringbench import records
    from ringbench.progress import ProgressBar, summary_table
    from ringbench.run import distributed, supervisor, worker

    with _user_errors():
        if resume is not None and not records.is_run_dir(resume):
            raise UserError(f"{resume}: not a run folder (no {records.RUN_FILE})")
        if retry_failed and resume is None:
            raise UserError("--retry-failed goes with --resume RUN_DIR")
        predicted = _predictions(predictions, resume)
        if config is None:
            if resume is None:
                raise UserError("give a sweep config, or --resume RUN_DIR")
            config = records.config_file(records.read_run(resume))
        sweep, the_plan, device = _load(config)
        _check_predicts(predicted, predictions, the_plan, config)
    if dry_run:
        _print_plan(config, the_plan)
        return
    if distributed.launched():  # one rank of a group the user started with torchrun
        run_dir = worker.serve(
            sweep, the_plan, None, None, str(config), output_root or Path(sweep.output_root), threads, predicted
        )
        print(f"records in {run_dir}", file=sys.stderr)
        return
    console = Console(stderr=True)
    with _user_errors(), ProgressBar(console) as bar:
        result = supervisor.run(
            sweep,
            the_plan,
            str(config),
            device,
            bar,
            output_root or Path(sweep.output_root),
            resume,
            retry_failed,
            threads,
            predicted,
        )
    console.print(summary_table(result.records))
    if result.interrupted:
        # Plainly, not through Rich: the command must stay on one line, to be copied.
        print(
            f"interrupted: {len(result.records)} finished cells kept in {result.run_dir}; "
            f"continue with: ringbench run --resume {result.run_dir}",
            file=sys.stderr,
        )
        raise typer.Exit(supervisor.EXIT_INTERRUPTED)
    console.print(f"{len(result.records)} cells recorded; next: ringbench report {result.run_dir}")
    print(result.run_dir)  # on stdout, for scripts: the run folder


def _load_runs(paths: list[Path]) -> list:
    """The runs the paths hold; a run that cannot be read is a warning while others can."""
    from ringbench.report import find_runs, load_run
    from ringbench.report.load import UnreadableRun

    runs, skipped = [], []
    for path in find_runs(paths):
        try:
            runs.append(load_run(path))
        except UnreadableRun as exc:  # the other runs still render
            skipped.append(str(exc))
    if not runs:
        raise UserError("; ".join(skipped))
    for warning in skipped + [warning for run_data in runs for warning in run_data.warnings]:
        print(f"warning: {warning}", file=sys.stderr)
    return runs


@app.command()
def predict(
    config: Path = typer.Argument(..., help="sweep YAML whose multi-process cells to predict"),
    runs: list[Path] = typer.Argument(
        ..., help="run folders measured before, or folders of them: the peer's single-GPU cells, calibration.json"
    ),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="also write the predictions here, for ringbench run --predictions"
    ),
    gpus_per_node: int | None = typer.Option(None, min=1, help="GPUs per node of the machine predicted; default 8"),
    inter_node_gbit_s: float | None = typer.Option(
        None, min=1e-3, help="stated bandwidth between nodes, per GPU, in Gb/s; default 400"
    ),
) -> None:
    """Predict, with the scaling model, what a sweep's multi-process cells will measure, from runs
    measured before: per cell the time of a call and the per-GPU efficiency against one GPU."""
    from ringbench import records
    from ringbench.report import model, predictions
    from ringbench.sweep import plan

    with _user_errors():
        _, the_plan = plan.load(config)
        sources = _load_runs(runs)
        payload = predictions.make(
            the_plan.cells,
            sources,
            str(config),
            gpus_per_node or model.GPUS_PER_NODE,
            inter_node_gbit_s or model.INTER_NODE_GBIT_S,
        )
        if output is not None:
            records.write_json_atomic(records.writable(output), payload)
    print(predictions.render(payload))
    if output is not None:
        print(f"wrote {output}; keep it with the run: ringbench run {config} --predictions {output}", file=sys.stderr)


# Over 60 lines: a third of them are its options, which typer reads from the signature.
@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="run folders, or folders holding them"),
    output: Path | None = typer.Option(None, "-o", "--output", help="where to write the report"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="write the file without printing it"),
    output_format: str = typer.Option(
        "markdown", "--format", help="markdown; html (one file, figures embedded); csv / json: one row per cell"
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="skip the figures"),
    merge: bool = typer.Option(False, "--merge", help="several runs as one report, by cell; the newest record wins"),
    baseline: str | None = typer.Option(
        None,
        "--baseline",
        help="implementation (name or label) that speed-ups and memory ratios are against; default: the one "
        "declaring the baseline role (standard), else the peer role (sdpa), else the first one run",
    ),
) -> None:
    """Render stored runs. A run folder: its report.md, also printed. A folder of runs: each run's
    report.md and figures in its own folder (where missing or out of date), and index.md in the
    folder; the index and the newest run's findings are printed. --merge: one report of all cells."""
    from ringbench import records
    from ringbench.report import index, render_merged, render_report, render_table, to_html
    from ringbench.report.markdown import fold
    from ringbench.report.render import render_findings

    names = {"markdown": "report.md", "html": "report.html", "csv": "report.csv", "json": "report.json"}
    with _user_errors():
        if output_format not in names:
            raise UserError(f"--format: expected {', '.join(names)}, got {output_format!r}")
        runs = _load_runs(paths)
    folders = [path for path in paths if not records.is_run_dir(path)]
    if output_format == "markdown" and not merge and output is None and (folders or len(runs) > 1):
        with _user_errors():
            written = index.refresh(runs, folders, baseline, plots=not no_plots)
            findings = render_findings(max(runs, key=lambda run_data: run_data.path.name), baseline)
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
        if not quiet:
            # The last folder's runs, as its index.md lists them; else every run named.
            root = folders[-1] if folders else Path.cwd()
            width = shutil.get_terminal_size().columns  # 80 where the output is not a terminal
            print(index.terminal_index(index.within(runs, root) if folders else runs, root, width))
            print(fold(findings, width))
        return
    if merge and output is None and folders:  # beside the runs, not loose among them
        target = paths[0] / "merged" / names[output_format]
    else:
        target = output or (paths[0] / names[output_format] if len(paths) == 1 else Path(names[output_format]))
    with _user_errors():
        records.writable(target)

    def markdown(plots_dir: Path | None) -> str:
        if merge:
            return render_merged(runs, plots_dir=plots_dir, baseline=baseline)
        return render_report(runs, plots_dir=plots_dir, baseline=baseline)

    with _user_errors():
        if output_format == "markdown":
            text = markdown(None if no_plots else target.parent)
        elif output_format == "html":
            with tempfile.TemporaryDirectory() as figures:  # embedded, so nothing is left beside the page
                text = to_html(markdown(None if no_plots else Path(figures)), Path(figures))
        else:
            text = render_table(runs, output_format)
        records.write_text_atomic(target, text)
    if not quiet:
        print(text)
    print(f"wrote {target}", file=sys.stderr)


@app.command()
def compare(
    base: Path = typer.Argument(..., help="run folder measured before the change"),
    new: Path = typer.Argument(..., help="run folder measured after it"),
    threshold: float = typer.Option(1.1, help="ratio of medians that counts as a change"),
    alpha: float = typer.Option(0.05, help="significance level of the Mann-Whitney U test"),
    fail_above: float | None = typer.Option(
        None, "--fail-above", help="exit 1 if a cell is significantly slower by more than this ratio, or newly failing"
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="also write the comparison as Markdown"),
    labels: tuple[str, str] | None = typer.Option(
        None,
        "--labels",
        metavar="BASE NEW",
        help="compare the cells labelled BASE in base with those labelled NEW in new (one run may be both), "
        "matched by every other parameter: e.g. 'torch-cp backend=cudnn' 'ring kernel=cudnn zigzag=true'",
    ),
) -> None:
    """Compare two runs cell by cell: faster, slower, unchanged, newly failing, fixed."""
    from rich.table import Table

    from ringbench import records
    from ringbench.report.compare import compare_runs, p_text, regressions, render_markdown

    with _user_errors():
        for path in (base, new):
            if not records.is_run_dir(path):
                raise UserError(f"{path}: not a run folder (no {records.RUN_FILE})")
        if output:
            records.writable(output)
        comparison = compare_runs(base, new, threshold, alpha, labels if labels and all(labels) else None)
    title = f"{new.name} against {base.name}"
    if comparison.labels:
        title = f"{comparison.labels[1]} in {new.name} against {comparison.labels[0]} in {base.name}"
    view = Table(title=title)
    for column in ("cell", "base ms", "new ms", "new / base", "p", "verdict"):
        view.add_column(column, justify="left" if column in ("cell", "verdict") else "right")
    for row in comparison.rows:
        view.add_row(
            row["cell"],
            *("-" if row[key] is None else f"{row[key]:.4g}" for key in ("base_ms", "new_ms", "ratio")),
            p_text(row["p"], blank="-"),
            row["verdict"],
        )
    console = Console()
    console.print(view)
    for warning in comparison.warnings:
        console.print(f"warning: {warning}")
    if output:
        with _user_errors():
            records.write_text_atomic(output, render_markdown(comparison, threshold, alpha))
    if fail_above is not None and (failing := regressions(comparison, fail_above)):
        print(f"{len(failing)} regression(s) beyond {fail_above:g}x or newly failing", file=sys.stderr)
        raise typer.Exit(1)


def main() -> None:
    app()
