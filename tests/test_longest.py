"""The longest-sequence search: its pure next-probe rule, the config and plan that ask for it, and
whole searches run by workers on one and two processes against a fake with a known memory limit."""

import json
import random
from dataclasses import replace

import pytest
from conftest import killed_run, registry_with_fakes
from typer.testing import CliRunner

from ringbench import records
from ringbench.cli import app
from ringbench.run import jobs
from ringbench.sweep import config
from ringbench.sweep.longest import Search, SearchSpec, bounds, next_probe, predicted_longest, run_search
from ringbench.sweep.plan import Plan, build
from ringbench.vocabulary import Cell


def _searched(spec, limit):
    return run_search(spec, lambda seq_len: seq_len <= limit)


@pytest.mark.parametrize(
    "spec",
    [SearchSpec(4, 1), SearchSpec(8, 4), SearchSpec(12, 4), SearchSpec(16, 8, 96), SearchSpec(4, 4, 40)],
    ids=str,
)
def test_every_limit_is_bracketed_within_the_granularity(spec):
    for limit in range(0, 130):
        outcomes = _searched(spec, limit)
        longest, failed = bounds(outcomes)
        assert all(seq_len % spec.granularity == 0 for seq_len in outcomes)
        assert spec.max is None or max(outcomes) <= spec.max
        assert longest is None or longest <= limit  # never claims more than fits
        if failed is None:  # stopped by the bound: everything up to it ran
            assert longest == spec.max and spec.max <= limit
        else:
            assert limit < failed and failed - (longest or 0) <= spec.granularity
        if longest is None:  # not even one granule runs
            assert failed == spec.granularity
        # Doubling then bisection: a probe count logarithmic in the span, never a linear walk.
        span = (spec.max or 2 * max(limit, spec.start)) // spec.granularity
        assert len(outcomes) <= 2 * span.bit_length() + 2


def test_the_probes_of_one_search_in_order():
    spec = SearchSpec(128, 64)
    order = []
    outcomes = {}
    while (seq_len := next_probe(spec, outcomes)) is not None:
        order.append(seq_len)
        outcomes[seq_len] = seq_len <= 1000
    assert order == [128, 256, 512, 1024, 768, 896, 960]
    # The start failing halves downward; one granule failing ends the search with nothing.
    assert list(_searched(SearchSpec(64, 8), 20)) == [64, 32, 16, 24]
    assert list(_searched(SearchSpec(64, 8), 3)) == [64, 32, 16, 8]


def test_a_failure_below_a_length_that_ran_does_not_bound_the_search():
    assert bounds({64: True, 32: False, 256: False}) == (64, 256)
    assert next_probe(SearchSpec(32, 32), {64: True, 32: False, 256: False}) == 160


CELL = Cell(
    "ring",
    (("kernel", "auto"), ("transfers", "nccl"), ("zigzag", False)),
    64,
    2,
    1,
    2,
    8,
    "float32",
    False,
    "forward",
    2,
)


def test_the_memory_models_prediction_is_the_search_run_against_it():
    search = Search(CELL, SearchSpec(64, 16))
    # Per rank: q, k, v's half (3·S·2·8·4 / 2 bytes) plus the model's 100 bytes per token.
    predicted = predicted_longest(search, lambda cell: 100 * cell.seq_len, lambda cell: 0, capacity_bytes=100_000)
    # 196 bytes a token: 510 tokens fit, and 496 is the longest multiple of the granularity below.
    assert predicted == 496


def test_a_prediction_counts_the_output_gradient_and_what_setup_keeps_and_needs_a_figure_for_every_probe():
    search = Search(replace(CELL, pass_name="forward+backward"), SearchSpec(64, 16))
    # Per rank: q, k, v and the output gradient's half (4·S·2·8·4 / 2 bytes), the 50 bytes a token
    # setup keeps, and the model's 100: 278 bytes a token, so 359 fit and 352 is the prediction.
    assert predicted_longest(search, lambda cell: 100 * cell.seq_len, lambda cell: 50 * cell.seq_len, 100_000) == 352
    # A model without a figure for a probe (here, beyond 256 tokens) predicts nothing.
    unmodelled = predicted_longest(
        search, lambda cell: 100 * cell.seq_len if cell.seq_len <= 256 else None, lambda cell: 0, 100_000
    )
    assert unmodelled is None


SEARCH_CONFIG = """\
plugins: [fake_impls]
implementations:
  - test-limited
  - {name: ring, options: {zigzag: true}}
longest: {start: 128, granularity: 64}
world_sizes: [1, 2]
heads: [1]
head_dims: [8]
dtypes: [float32]
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "longest: {start: 128, granularity: 64, passes: [backward]}\n",
            "longest.passes[0]: backward is not among the sweep's passes (forward)",
        ),
        (
            "longest: {start: 128, granularity: 64, causal: [true]}\n",
            "longest.causal[0]: true is not among the sweep's causal (false)",
        ),
        ("longest: {start: 100, granularity: 64}\n", "longest.start: must be a multiple of granularity (100 % 64)"),
        ("longest: {start: 128, granularity: 64, max: 64}\n", "longest.max: must not be below start (64 < 128)"),
        (
            "longest: {start: 128, granularity: 64, max: 200}\n",
            "longest.max: must be a multiple of granularity (200 % 64)",
        ),
        ("longest: {start: 128}\n", "longest.granularity: required key is missing"),
        (
            "longest: {start: 128, granularity: 64, step: 2}\n",
            "longest.step: unknown key (known: causal, granularity, max, passes, start)",
        ),
        ("memory_cap_gib: 0\n", "memory_cap_gib: expected a finite positive number, got 0"),
    ],
)
def test_config_errors_name_the_key(write_config, change, message):
    key = change.split(":")[0]
    body = "".join(line + "\n" for line in SEARCH_CONFIG.splitlines() if not line.startswith(key) or key == "seq_lens")
    path = write_config(body + change)
    with pytest.raises(config.ConfigError) as raised:
        config.load(path, registry_with_fakes())
    assert str(raised.value) == f"{path}: {message}"


def test_the_plan_holds_a_search_per_placement_and_leaves_out_what_a_granule_breaks(write_config):
    registry = registry_with_fakes()
    sweep = config.load(write_config(SEARCH_CONFIG.replace("granularity: 64", "granularity: 2")), registry)
    assert sweep.seq_lens == () and "memory_cap_gib" not in sweep.as_dict()
    plan = build(sweep, registry.get)
    assert plan.cells == ()
    assert [(s.cell.implementation, s.cell.world_size, s.cell.seq_len) for s in plan.searches] == [
        ("test-limited", 1, 128),
        ("test-limited", 2, 128),
        ("ring", 1, 128),
    ]
    # Probes are multiples of 2, which zigzag on two processes cannot always split in four.
    (left_out,) = plan.excluded
    assert (left_out.cell.world_size, left_out.cell.seq_len) == (2, 2)
    assert left_out.reason == "zigzag needs seq_len divisible by 2 × ring_size (4)"
    listed = CliRunner().invoke(app, ["plan", str(write_config(SEARCH_CONFIG))])
    assert listed.exit_code == 0 and listed.output.splitlines()[0].endswith("4 searches planned, 0 left out")
    assert "test-limited S=128 2 processes B=1 H=1 D=8 float32 forward: longest that runs, doubling" in listed.output


def test_jobs_resume_a_search_from_its_recorded_probes():
    search = Search(CELL, SearchSpec(64, 16))
    plan = Plan((), (), {}, (search,))
    done = [records.Record.of_cell(search.probe(s), status) for s, status in ((64, "ok"), (128, "oom"))]
    (job,) = jobs.planned(plan, done)
    assert job.current() == search.probe(96)
    (again,) = jobs.from_json(json.loads(json.dumps([job.as_json()])), plan)
    assert again.outcomes == {64: True, 128: False} and again.current() == search.probe(96)
    finished = done + [records.Record.of_cell(search.probe(s), "ok") for s in (96, 112)]
    assert jobs.planned(plan, finished) == []


RUN_CONFIG = """\
plugins: [fake_impls]
implementations:
  - test-limited
  - {name: test-limited, options: {dies_above: 1000}, label: dying}
longest: {start: 128, granularity: 64}
world_sizes: [1, 2]
heads: [1]
head_dims: [8]
dtypes: [float32]
timing: {warmup_ms: 1, rep_ms: 2, min_reps: 2, max_reps: 3}
"""


def _probes(stored, label, world_size):
    return [(r.seq_len, r.status) for r in stored if r.display_label == label and r.world_size == world_size]


def test_searches_on_one_and_two_processes_find_the_limit_and_keep_every_probe(write_config):
    path = write_config(RUN_CONFIG)
    out = path.parent / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    stored = list(records.read_records(run_dir))
    # 1000 tokens fit per process: on two processes twice as long a sequence.
    ran_up_to_1000 = [(128, "ok"), (256, "ok"), (512, "ok"), (1024, "oom"), (768, "ok"), (896, "ok"), (960, "ok")]
    assert _probes(stored, "test-limited", 1) == ran_up_to_1000
    assert _probes(stored, "test-limited", 2) == [
        *[(s, "ok") for s in (128, 256, 512, 1024)],
        (2048, "oom"),
        *[(s, "ok") for s in (1536, 1792, 1920, 1984)],
    ]
    # A probe that kills its worker is blamed like any cell, and a fresh worker goes on with the search.
    assert _probes(stored, "dying", 1) == [(s, "crashed" if s == 1024 else st) for s, st in ran_up_to_1000]
    assert ("2048", "crashed") in [(str(s), st) for s, st in _probes(stored, "dying", 2)]
    assert not list(run_dir.glob("pending-*.json")) and not list(run_dir.glob("inflight-*.json"))
    report = CliRunner().invoke(app, ["report", str(run_dir), "--no-plots", "-q"])
    assert report.exit_code == 0 and "not in this run's plan" not in report.output
    markdown = (run_dir / "report.md").read_text()
    assert f"**Probes**: {len(stored)} recorded in `{run_dir.name}` for 4 searches" in markdown
    section = markdown.split("## Longest sequence\n")[1].split("\n## ")[0]
    assert section.split("\n\n", 1)[1].strip() == LONGEST_TABLES.strip()
    assert (
        "  - `test-limited` forward: 960 at 1 process → 1,984 at 2 (2.07×)\n"
        "  - `dying` forward: 960 at 1 process → 1,984 at 2 (2.07×)\n"
    ) in markdown


LONGEST_TABLES = """\
**1 process**

| implementation   |   longest that ran |   shortest that failed |   probes |   model |
|:-----------------|-------------------:|-----------------------:|---------:|--------:|
| test-limited     |                960 |            1,024 (OOM) |        7 |       — |
| dying            |                960 |        1,024 (crashed) |        7 |       — |

**2 processes**

| implementation   |   longest that ran |   shortest that failed |   probes |   model |   against 1 process |
|:-----------------|-------------------:|-----------------------:|---------:|--------:|--------------------:|
| test-limited     |              1,984 |            2,048 (OOM) |        9 |       — |               2.07× |
| dying            |              1,984 |        2,048 (crashed) |        9 |       — |               2.07× |
"""


def test_a_search_killed_at_random_moments_resumes_where_it_stopped(write_config):
    path = write_config(
        RUN_CONFIG.replace("world_sizes: [1, 2]", "world_sizes: [1]").replace(
            "{warmup_ms: 1, rep_ms: 2, min_reps: 2, max_reps: 3}", "{warmup_ms: 20, rep_ms: 60, min_reps: 2}"
        )
    )
    chooser = random.Random(18)
    for trial in range(2):
        out = path.parent / f"out{trial}"
        run_dir = killed_run(path, out, chooser)
        before = [line for line in (run_dir / "records.jsonl").read_text().splitlines() if line.endswith("}")]
        result = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
        assert result.exit_code == 0, result.output
        after = (run_dir / "records.jsonl").read_text().splitlines()
        assert after[: len(before)] == before  # finished probes untouched
        stored = list(records.read_records(run_dir))
        # Each probe once, in the order an uninterrupted search takes them.
        assert [s for s, _ in _probes(stored, "test-limited", 1)] == [128, 256, 512, 1024, 768, 896, 960]
        assert [s for s, _ in _probes(stored, "dying", 1)] == [128, 256, 512, 1024, 768, 896, 960]


def test_across_processes_a_search_is_set_against_its_own_one_process_search_and_the_peer_with_predictions_shown():
    from ringbench.report.longest import Found, findings, tables
    from ringbench.vocabulary import Placement

    shape = ("forward", "bfloat16", False, 1, 16, 128)

    def found(label, processes, longest, failed, predicted=None, peer=False, finished=True):
        where = Placement(2, processes) if processes > 1 else Placement(0, 0)
        return Found(label, where, shape, peer, longest, failed, "OOM", 5, None, predicted, finished)

    results = [
        found("sdpa", 1, 262_144, 270_336, predicted=266_240, peer=True),
        found("ring", 1, 253_952, 262_144, predicted=258_048),
        found("ring", 2, 507_904, 516_096),
        found("ulysses", 2, 499_712, 507_904),
        found("usp", 2, 131_072, None, finished=False),
    ]
    assert tables(results)[-2].splitlines()[2:] == [
        "| ring             |            507,904 |           516,096 (OOM) |        5 |       — |   2.00×; 1.94× sdpa |",
        "| ulysses          |            499,712 |           507,904 (OOM) |        5 |       — |          1.91× sdpa |",
        "| usp              |            131,072 | not searched to the end |        5 |       — |          0.50× sdpa |",
    ]
    assert (
        "| sdpa             |            262,144 |          270,336 (OOM) |        5 | 266,240 |" in tables(results)[2]
    )
    assert findings(results) == [
        "- Longest sequence that runs, by number of processes:",
        "  - `ring` forward: 253,952 at 1 process → 507,904 at 2 (2.00×; 1.94× sdpa)",
        "  - `ulysses` forward: 499,712 at 2 processes (1.91× sdpa)",
        "  - `usp` forward: 131,072 at 2 processes (0.50× sdpa)",
    ]


def test_a_search_only_run_names_the_gpus_its_probes_ran_on():
    from ringbench.report.render import devices

    meta = {
        "environment": {"device": "cuda:0", "gpus": [{"name": "NVIDIA H200"}] * 4},
        "planned": [],
        "searches": [{"world_size": 1}, {"world_size": 2}],
    }
    assert devices(meta) == "NVIDIA H200 ×2"


def test_listed_lengths_and_a_search_in_one_run_share_the_cells_they_both_need(write_config):
    path = write_config(
        "plugins: [fake_impls]\nimplementations: [test-limited]\nseq_lens: [256, 2048]\n"
        "longest: {start: 128, granularity: 64, causal: [true]}\ncausal: [false, true]\n"
        "heads: [1]\nhead_dims: [8]\ndtypes: [float32]\ntiming: {warmup_ms: 1, rep_ms: 2, min_reps: 2, max_reps: 3}\n"
    )
    listed = CliRunner().invoke(app, ["plan", str(path)])
    assert listed.output.splitlines()[0].endswith("4 cells and 1 search planned, 0 left out")
    out = path.parent / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--output-root", str(out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.iterdir()
    stored = list(records.read_records(run_dir))
    # Each cell once: the causal search takes the listed causal cells' outcomes (256 ran, 2048 did
    # not) and bisects between them, never probing its start or a listed length again.
    assert len({r.cell_id for r in stored}) == len(stored)
    causal = {r.seq_len: r.status for r in stored if r.causal}
    assert causal[256] == "ok" and causal[2048] == "oom" and 128 not in causal
    assert bounds({s: status == "ok" for s, status in causal.items()}) == (960, 1024)
    assert sorted(r.seq_len for r in stored if not r.causal) == [256, 2048]
    report = CliRunner().invoke(app, ["report", str(run_dir), "--no-plots", "-q"])
    assert report.exit_code == 0 and "not in this run's plan" not in report.output
    markdown = (run_dir / "report.md").read_text()
    assert f"**Cells**: 4 of 4 planned; **probes**: {len(stored) - 4} recorded in `{run_dir.name}` for 1 search" in (
        markdown
    )
    assert "- **longest**: doubling from 128, then bisection to 64 (only causal: true)" in markdown
    assert "- **seq_lens**: 256, 2048" in markdown
    assert "| test-limited     |                960 |            1,024 (OOM) |" in markdown
