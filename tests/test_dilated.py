import itertools
from dataclasses import replace

import pytest
import torch

from ringbench import Problem
from ringbench.attention import models
from ringbench.attention.impls.dilated import DilatedReference, patterns
from ringbench.attention.inputs import Given
from ringbench.attention.references import DENSE
from ringbench.attention.registry import Registry
from ringbench.errors import ConfigError
from ringbench.run import correctness
from ringbench.sweep import config, plan
from ringbench.vocabulary import Cell

BUNDLED = Registry.bundled()

PATTERNS = [((16, 32), (1, 2)), ((8, 16, 48), (1, 2, 4)), ((24,), (3,)), ((96, 32), (4, 2))]


def cell(name, seq_len, ring_size, causal, lengths, rates, heads=3):
    options = (("dilation_rates", rates), ("kernel", "auto"), ("segment_lengths", lengths))
    return Cell(name, options, seq_len, ring_size, 2, heads, 8, "float32", causal, "forward")


def runnable(name, seq_len, ring_size, causal, lengths, rates):
    c = cell(name, seq_len, ring_size, causal, lengths, rates)
    return not (ring_size and seq_len % ring_size) and BUNDLED.get(name).excludes(c) is None


GRID = [
    (name, seq_len, ring_size, causal, lengths, rates)
    for (name, ring_sizes), seq_len, causal, (lengths, rates) in itertools.product(
        [("dilated", [None]), ("ring-dilated", range(1, 9))], [48, 96, 192], [False, True], PATTERNS
    )
    for ring_size in ring_sizes
    if runnable(name, seq_len, ring_size, causal, lengths, rates)
]


def make(seq_len, ring_size, causal, lengths, rates, heads=3):
    generator = torch.Generator().manual_seed(seq_len)
    q, k, v = (torch.randn(2, heads, seq_len, 8, generator=generator) for _ in range(3))
    options = {"segment_lengths": lengths, "dilation_rates": rates, "kernel": "auto"}
    return Problem.of(q, k, v, causal=causal, ring_size=ring_size, options=options)


def test_grid_covers_spanning_segments_and_rings():
    assert len(GRID) > 60
    assert any(name == "ring-dilated" and max(lengths) > seq_len // ring for name, seq_len, ring, _, lengths, _ in GRID)


@pytest.mark.parametrize("name, seq_len, ring_size, causal, lengths, rates", GRID)
def test_dilated_matches_its_reference_and_really_dilates(name, seq_len, ring_size, causal, lengths, rates):
    p = make(seq_len, ring_size, causal, lengths, rates)
    out = BUNDLED.get(name).setup(p)()
    rows = torch.arange(seq_len)
    torch.testing.assert_close(
        out.double(), correctness.reference_rows(DilatedReference(), p, rows), rtol=1e-5, atol=1e-5
    )
    # Not dense attention in disguise: the output differs from it.
    assert (out.double() - correctness.reference_rows(DENSE, p, rows)).abs().max() > 1e-2


@pytest.mark.parametrize("name, seq_len, ring_size, causal, lengths, rates", GRID[::3])
def test_dilated_gradients_match_float64_autograd_of_the_reference(name, seq_len, ring_size, causal, lengths, rates):
    p = make(seq_len, ring_size, causal, lengths, rates)
    grad_out = torch.randn(p.q.shape, generator=torch.Generator().manual_seed(1))
    p = replace(p, inputs=Given(*(t.requires_grad_() for t in (p.q, p.k, p.v)), grad_out))
    out = BUNDLED.get(name).setup(p)()
    grads = torch.autograd.grad(out, (p.q, p.k, p.v), grad_out)
    gradients = _gradient_check(DilatedReference(), p, grads)
    assert gradients["checked"] and gradients["rel_error"] < 1e-5, gradients
    # Against dense attention's gradients they are far off: the check sees the difference.
    assert _gradient_check(DENSE, p, grads)["rel_error"] > 1e-2


def _gradient_check(reference, p, grads):
    sums = correctness.gradient_partials(reference, p, grads, 0)
    return correctness.gradient_verdict(sums, 1e-4, correctness.GradientSample.of(p.inputs.shape, p.device, 0))


def test_one_full_segment_without_dilation_is_dense_attention():
    p = make(64, None, True, (64,), (1,))
    out = BUNDLED.get("dilated").setup(p)()
    torch.testing.assert_close(
        out.double(), correctness.reference_rows(DENSE, p, torch.arange(64)), rtol=1e-5, atol=1e-5
    )


def test_rows_no_pattern_selects_are_zero():
    # One pattern with r = 2: head 0 keeps even positions only, so its odd rows get nothing.
    p = make(32, None, False, (16,), (2,), heads=2)
    out = BUNDLED.get("dilated").setup(p)()
    assert torch.equal(out[:, 0, 1::2], torch.zeros_like(out[:, 0, 1::2]))
    assert torch.equal(out[:, 1, 0::2], torch.zeros_like(out[:, 1, 0::2]))
    assert out[:, 0, 0::2].abs().sum() > 0


def test_segments_longer_than_the_sequence_are_clipped():
    assert patterns({"segment_lengths": (64, 256), "dilation_rates": (1, 4)}, 128) == [(64, 1), (128, 4)]


def test_flops_count_exactly_the_computed_pairs():
    seq_len, heads = 96, 3
    for lengths, rates in PATTERNS:
        c = cell("dilated", seq_len, None, False, lengths, rates, heads=heads)
        pairs = 0
        for w, r in patterns(dict(c.options), seq_len):
            keys = torch.arange(seq_len)
            for h in range(heads):
                kept = (keys % w) % r == h % r
                same = (keys // w).unsqueeze(0) == (keys // w).unsqueeze(1)
                pairs += (same & kept.unsqueeze(0) & kept.unsqueeze(1)).sum().item()
        assert BUNDLED.get("dilated").flops(c) == 4 * c.batch_size * c.head_dim * pairs
    dense = Cell("sdpa", (), 96, None, 2, 3, 8, "float32", True, "forward")
    assert models.dense_flops(dense) == 4 * 2 * 3 * 96 * 96 * 8 / 2


@pytest.mark.parametrize(
    "options, message",
    [
        (
            "{segment_lengths: [8, 16], dilation_rates: [1]}",
            "segment_lengths and dilation_rates differ in length (2 and 1)",
        ),
        ("{segment_lengths: [12], dilation_rates: [5]}", "segment length 12 is not divisible by its dilation rate 5"),
        ("{segment_lengths: [8, 8], dilation_rates: [2, 2]}", "a pattern (segment length, dilation rate) is repeated"),
        ("{segment_lengths: [8, 0], dilation_rates: [1, 1]}", None),
    ],
)
def test_pattern_options_are_validated(write_config, options, message):
    path = write_config(
        f"implementations: [{{name: dilated, options: {options}}}]\nseq_lens: [64]\nheads: [1]\n"
        "head_dims: [8]\ndtypes: [float32]\n"
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    expected = (
        f"{path}: implementations[0].options: {message}"
        if message
        else f"{path}: implementations[0].options.segment_lengths[1]: expected a positive integer, got 0"
    )
    assert str(caught.value) == expected


def test_indivisible_lengths_are_left_out_with_reasons(write_config):
    path = write_config(
        "implementations: [{name: ring-dilated, options: {segment_lengths: [32], dilation_rates: [2]}}]\n"
        "seq_lens: [64, 96, 48]\nring_sizes: [2, 3]\nheads: [1]\nhead_dims: [8]\ndtypes: [float32]\n"
    )
    the_plan = plan.load(path)[1]
    assert [(c.seq_len, c.ring_size) for c in the_plan.cells] == [(64, 2), (96, 3)]
    assert [(e.cell.seq_len, e.cell.ring_size, e.reason) for e in the_plan.excluded] == [
        (64, 3, "seq_len 64 is not divisible by ring_size 3"),
        (96, 2, "shard length 48 is not a multiple of segment length 32"),
        (48, 2, "seq_len 48 is not divisible by segment length 32"),
        (48, 3, "seq_len 48 is not divisible by segment length 32"),
    ]


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_each_ring_step_is_at_most_two_batched_runs_covering_every_block_once(parts, causal):
    from ringbench.attention.impls.dilated import step_runs

    seen = []
    for step in range(parts):
        runs = step_runs(parts, step, causal)
        assert len(runs) <= 2
        for q0, kv0, count, block_causal in runs:
            pairs = [(q0 + i, kv0 + i) for i in range(count)]
            assert all(0 <= q < parts and 0 <= kv < parts and kv == (q - step) % parts for q, kv in pairs)
            assert block_causal == (causal and step == 0)
            seen += pairs
    wanted = [(q, kv) for q in range(parts) for kv in range(parts) if not causal or kv <= q]
    assert sorted(seen) == sorted(wanted)
