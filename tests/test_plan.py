from conftest import BASE_CONFIG

from ringbench.sweep import plan
from ringbench.vocabulary import Cell


def build(path):
    return plan.load(path)[1]


def test_ids_are_stable_across_loads_and_pinned(write_config):
    first, second = build(write_config()), build(write_config(name="copy.yaml"))
    assert [c.id for c in first.cells] == [c.id for c in second.cells]
    assert len({c.id for c in first.cells}) == len(first.cells)
    # A literal pin: the id depends only on the parameters, never on the machine, run or hash seed.
    cell = Cell("sdpa", (("backend", "auto"),), 4096, None, 1, 8, 64, "float16", False, "forward")
    assert cell.id == "7c9f9d68061e"


def test_ringless_implementations_take_one_cell_per_combination(write_config):
    the_plan = build(write_config(BASE_CONFIG + "ring_sizes: [1, 2, 4]\ncausal: [false, true]\n"))
    # 2 implementations × 2 seq_lens × 2 causal, and no ring-size multiplication.
    assert len(the_plan.cells) == 8
    assert {c.ring_size for c in the_plan.cells} == {None}
    assert the_plan.excluded == ()


def test_indivisible_ring_sizes_are_left_out_with_a_reason(write_config):
    text = (
        BASE_CONFIG.replace("  - name: standard\n", "  - name: test-ring\n")
        + "ring_sizes: [1, 3, 4]\nplugins: [fake_impls]\n"
    )
    the_plan = build(write_config(text))
    ring_cells = [(c.seq_len, c.ring_size) for c in the_plan.cells if c.implementation == "test-ring"]
    assert ring_cells == [(64, 1), (64, 4), (96, 1), (96, 3), (96, 4)]
    assert [(e.cell.seq_len, e.cell.ring_size, e.reason) for e in the_plan.excluded] == [
        (64, 3, "seq_len 64 is not divisible by ring_size 3")
    ]
    assert the_plan.excluded[0].as_dict()["reason"] == "seq_len 64 is not divisible by ring_size 3"


def test_cells_of_one_shape_run_together(write_config):
    the_plan = build(write_config(BASE_CONFIG + "causal: [false, true]\n"))
    keys = [(c.causal, c.seq_len, c.implementation) for c in the_plan.cells]
    assert keys == [
        (False, 64, "standard"),
        (False, 64, "sdpa"),
        (False, 96, "standard"),
        (False, 96, "sdpa"),
        (True, 64, "standard"),
        (True, 64, "sdpa"),
        (True, 96, "standard"),
        (True, 96, "sdpa"),
    ]


def test_shuffle_reorders_within_each_shape_and_repeats_exactly(write_config):
    text = (
        BASE_CONFIG.replace("  - name: standard\n", "  - name: standard\n  - name: ring\n") + "ring_sizes: [1, 2, 4]\n"
    )
    ordered = build(write_config(text))
    shuffled = build(write_config(text + "shuffle: true\n", "shuffled.yaml"))
    again = build(write_config(text + "shuffle: true\n", "again.yaml"))
    assert [c.id for c in shuffled.cells] == [c.id for c in again.cells]
    assert [c.id for c in shuffled.cells] != [c.id for c in ordered.cells]
    assert sorted(c.id for c in shuffled.cells) == sorted(c.id for c in ordered.cells)
    assert [c.seq_len for c in shuffled.cells] == [c.seq_len for c in ordered.cells]  # shapes stay together
    reseeded = build(write_config(text + "shuffle: true\nseed: 7\n", "reseeded.yaml"))
    assert [c.id for c in reseeded.cells] != [c.id for c in shuffled.cells]


def test_torch_cp_runs_at_every_world_size_one_process_included(write_config):
    text = BASE_CONFIG.replace("  - name: standard\n", "  - {name: torch-cp, options: {backend: cudnn}}\n")
    the_plan = build(write_config(text + "world_sizes: [1, 2, 4]\n"))
    assert [
        (c.implementation, c.seq_len, c.world_size, c.ring_size)
        for c in the_plan.cells
        if c.implementation == "torch-cp"
    ] == [
        ("torch-cp", 64, 1, None),
        ("torch-cp", 64, 2, 2),
        ("torch-cp", 64, 4, 4),
        ("torch-cp", 96, 1, None),
        ("torch-cp", 96, 2, 2),
        ("torch-cp", 96, 4, 4),
    ]
    assert not the_plan.excluded
    assert dict(the_plan.cells[0].options) == {"backend": "cudnn", "rotate": "allgather"}
    rotating = build(write_config(text.replace("backend: cudnn", "rotate: alltoall") + "world_sizes: [1, 2]\n"))
    assert [(c.implementation, c.world_size) for c in rotating.cells if c.implementation == "torch-cp"] == [
        ("torch-cp", 2),
        ("torch-cp", 2),
    ]
    assert {(e.cell.world_size, e.reason) for e in rotating.excluded} == {
        (1, "in one process nothing rotates: torch-cp rotate=allgather runs the same")
    }


def test_usp_leaves_out_grids_its_degree_does_not_fit_with_a_reason(write_config):
    text = BASE_CONFIG.replace(
        "  - name: standard\n  - name: sdpa\n    options:\n      backend: auto\n",
        "  - {name: usp, options: {ulysses_degree: 2}}\n  - {name: usp, options: {ulysses_degree: 4, zigzag: true}}\n"
        "  - {name: usp, options: {ulysses_degree: 2, kernel: efficient}}\n"
        "  - {name: usp, options: {ulysses_degree: 2, zigzag: true}}\n",
    ).replace("seq_lens: [64, 96]", "seq_lens: [36]")
    the_plan = build(write_config(text + "world_sizes: [1, 2, 3, 4, 8]\npasses: [forward+backward]\n"))
    assert [(c.label, c.world_size) for c in the_plan.cells] == [
        ("usp u=2", 2),
        ("usp u=2", 4),
        ("usp u=2 zigzag=true", 2),
    ]
    reasons = {(e.cell.label, e.cell.world_size): e.reason for e in the_plan.excluded}
    assert reasons["usp u=2", 1] == "usp runs across processes only"
    assert reasons["usp u=2", 3] == "usp needs the world size divisible by ulysses_degree (3 processes, degree 2)"
    assert reasons["usp u=2", 8] == "seq_len 36 is not divisible by ring_size 8"
    assert reasons["usp u=2 zigzag=true", 4] == "seq_len 36 is not divisible by 2 × the world size (8)"
    assert reasons["usp u=4 zigzag=true", 2] == (
        "usp needs the world size divisible by ulysses_degree (2 processes, degree 4)"
    )
    assert reasons["usp u=4 zigzag=true", 4] == "usp needs heads divisible by ulysses_degree (2 heads, degree 4)"
    assert reasons["usp u=2 kernel=efficient", 2] == "usp's backward runs on flash, cudnn, math blocks, not efficient"
