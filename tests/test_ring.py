import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from ringbench import Problem
from ringbench.attention import blocks
from ringbench.attention.impls import ring
from ringbench.attention.impls.ring import merges_in_place, positions, ring_block, step_runs
from ringbench.attention.references import DENSE
from ringbench.attention.registry import Registry
from ringbench.run import correctness
from ringbench.vocabulary import Cell

BUNDLED = Registry.bundled()


def _relative(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


def problem(seq_len, ring_size, causal, zigzag, kernel="auto", seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, seq_len, 16, generator=generator, dtype=dtype) for _ in range(3))
    return Problem.of(q, k, v, causal=causal, ring_size=ring_size, options={"kernel": kernel, "zigzag": zigzag})


def excluded(seq_len, ring_size, zigzag):
    cell = Cell(
        "ring",
        (("kernel", "auto"), ("transfers", "nccl"), ("zigzag", zigzag)),
        seq_len,
        ring_size,
        2,
        3,
        16,
        "float32",
        False,
        "forward",
    )
    return seq_len % ring_size or BUNDLED.get("ring").excludes(cell)


def test_copy_engine_transfers_are_left_out_of_one_process_where_auto_is_not():
    def cell(transfers, world_size):
        options = (("kernel", "auto"), ("transfers", transfers), ("zigzag", False))
        return Cell("ring", options, 64, world_size, 1, 2, 8, "float32", False, "forward", world_size=world_size)

    ring = BUNDLED.get("ring")
    assert ring.excludes(cell("copy-engine", 1)) == "copy-engine transfers are between processes; one process has none"
    assert [ring.excludes(cell(transfers, world)) for transfers in ("auto", "nccl") for world in (1, 2)] == [None] * 4
    assert ring.excludes(cell("copy-engine", 2)) is None
    assert ring.options["transfers"].default == "auto"


GRID = [
    (seq_len, ring_size, causal, zigzag)
    for seq_len, ring_size, causal, zigzag in itertools.product([48, 60, 96], range(1, 9), [False, True], [False, True])
    if not excluded(seq_len, ring_size, zigzag)
]


@pytest.mark.parametrize("seq_len, ring_size, causal, zigzag", GRID)
def test_ring_matches_float64_reference(seq_len, ring_size, causal, zigzag):
    p = problem(seq_len, ring_size, causal, zigzag)
    out = BUNDLED.get("ring").setup(p).run()
    rows = torch.arange(seq_len)
    torch.testing.assert_close(out.double(), correctness.reference_rows(DENSE, p, rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "ring_size, causal, zigzag", [(4, False, False), (4, True, False), (4, True, True), (3, True, True)]
)
def test_rank_share_computes_that_ranks_rows(ring_size, causal, zigzag):
    seq_len = 48
    p = problem(seq_len, ring_size, causal, zigzag)
    share = BUNDLED.get("ring").setup(p).rank_share()
    # The last rank's rows, in its shard's order.
    expected = correctness.reference_rows(DENSE, p, positions(seq_len, ring_size, zigzag)[-1])
    torch.testing.assert_close(share.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ring_size, causal, zigzag", itertools.product([1, 2, 3, 5, 8], [False, True], [False, True]))
def test_schedule_computes_every_needed_pair_exactly_once(ring_size, causal, zigzag):
    seq_len = 4 * ring_size
    shard_len = seq_len // ring_size
    rows = positions(seq_len, ring_size, zigzag)
    visits = torch.zeros(seq_len, seq_len, dtype=torch.long)
    for rank, step in itertools.product(range(ring_size), range(ring_size)):
        spec = ring_block(rank, step, ring_size, shard_len, causal, zigzag)
        if spec is None:
            continue
        q_pos, k_pos = rows[rank][spec.q_rows], rows[spec.kv_rank][spec.kv_rows]
        pairs = torch.ones(len(q_pos), len(k_pos), dtype=torch.long)
        if spec.causal:
            pairs = pairs.tril()
        # A block computed without a causal mask must never include a future key.
        if causal and not spec.causal:
            assert (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).all()
        visits[q_pos.unsqueeze(1), k_pos.unsqueeze(0)] += pairs
    needed = torch.ones(seq_len, seq_len, dtype=torch.long)
    assert torch.equal(visits, needed.tril() if causal else needed)


def test_zigzag_positions():
    assert positions(8, 2, True).tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert positions(8, 2, False).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("ring_size, causal, zigzag", itertools.product([1, 2, 3, 5, 8], [False, True], [False, True]))
def test_step_runs_batch_each_steps_blocks_into_at_most_two_calls(ring_size, causal, zigzag):
    shard_len = 4
    for step in range(ring_size):
        runs = step_runs(step, ring_size, shard_len, causal, zigzag)
        assert len(runs) <= 2
        # Spread out rank by rank, the runs are exactly the blocks the ranks compute in this step.
        spread = {
            run.first + i: (run.kv_first + i, run.q_rows, run.kv_rows, run.causal)
            for run in runs
            for i in range(run.count)
        }
        expected = {}
        for rank in range(ring_size):
            spec = ring_block(rank, step, ring_size, shard_len, causal, zigzag)
            if spec is not None:
                expected[rank] = (spec.kv_rank, spec.q_rows, spec.kv_rows, spec.causal)
        assert spread == expected


def test_block_log_sum_exp_merges_exactly():
    q, k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64) for _ in range(3))
    out, lse = blocks.attend("math", q, k, v, False)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6)
    acc = torch.zeros(1, 2, 20, 8)
    acc_lse = torch.full((1, 2, 20), float("-inf"))
    for part in (slice(0, 7), slice(7, 20)):
        blocks.merge_(acc, acc_lse, *blocks.attend("math", q, k[:, :, part], v[:, :, part], False))
    torch.testing.assert_close(acc.double(), out, rtol=1e-6, atol=1e-6)


def test_a_block_merged_once_into_another_in_its_own_dtype_rounds_once_as_a_float32_accumulator_would():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.bfloat16) for _ in range(3))
    halves = (slice(0, 12), slice(12, 24))
    first, second = (blocks.attend("math", q, k[:, :, part], v[:, :, part], False) for part in halves)
    acc, acc_lse = first[0].float(), first[1].clone()
    blocks.merge_(acc, acc_lse, *second)
    in_place, in_place_lse = first  # the first block's own output takes the merge
    blocks.merge_(in_place, in_place_lse, *second)
    assert in_place.dtype == torch.bfloat16
    assert torch.equal(in_place, acc.to(torch.bfloat16)) and torch.equal(in_place_lse, acc_lse)
    # Only rings whose rows take one merge at most, in a narrower dtype than float32, merge in place.
    assert merges_in_place(2, 2) and not merges_in_place(3, 2) and not merges_in_place(2, 4)


def test_kernel_choice_on_cpu():
    q = torch.randn(1, 1, 8, 8)
    assert blocks.choose("auto", q) == "math"
    with pytest.raises(ValueError, match="kernel 'cudnn' needs a CUDA device"):
        blocks.choose("cudnn", q)


def test_auto_picks_a_kernel_with_a_block_backward_for_backward_passes(monkeypatch):
    # A GPU where only the memory-efficient kernel runs the inputs (float32, say): forward passes take
    # it, passes with a backward the math blocks, as it has no block backward.
    monkeypatch.setattr(blocks, "_works", lambda kernel, device, dtype, head_dim: kernel == "efficient")
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32, shape=(1, 1, 64, 8))
    assert blocks.choose("auto", on_gpu) == "efficient"
    assert blocks.choose("auto", on_gpu, backward=True) == "math"
    monkeypatch.setattr(blocks, "_works", lambda kernel, device, dtype, head_dim: kernel != "cudnn")
    assert blocks.choose("auto", on_gpu, backward=True) == "flash"


def test_zigzag_needs_two_chunks_per_rank(write_config):
    from ringbench.sweep import plan

    path = write_config(
        "implementations: [{name: ring, options: {zigzag: true}}]\nseq_lens: [48, 36]\n"
        "ring_sizes: [4]\nheads: [1]\nhead_dims: [8]\ndtypes: [float32]\n"
    )
    the_plan = plan.load(path)[1]
    assert [c.seq_len for c in the_plan.cells] == [48]
    assert the_plan.excluded[0].reason == "zigzag needs seq_len divisible by 2 × ring_size (8)"


def dense_gradients(p, grad_out):
    """Float64 autograd through dense attention: the reference every ring gradient is held to."""
    q, k, v = (t.detach().double().requires_grad_() for t in (p.q, p.k, p.v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if p.causal:
        scores = scores.masked_fill(torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    return torch.autograd.grad(torch.softmax(scores, -1) @ v, (q, k, v), grad_out.double())


@pytest.mark.parametrize("seq_len, ring_size, causal, zigzag", GRID)
def test_ring_gradients_match_float64_reference(seq_len, ring_size, causal, zigzag):
    p = problem(seq_len, ring_size, causal, zigzag)
    for tensor in (p.q, p.k, p.v):
        tensor.requires_grad_()
    out = BUNDLED.get("ring").setup(p).run()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (p.q, p.k, p.v), grad_out)
    for value, expected in zip(grads, dense_gradients(p, grad_out)):
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)


# The gradient error of a ring of P shards, in bfloat16, stays within this factor of
# the error without a ring (P = 1): block gradients add up in float32.
GRADIENT_ERROR_GROWTH_BOUND = 1.25


@pytest.mark.parametrize("causal", [False, True])
def test_gradient_error_does_not_grow_with_ring_size(causal):
    errors = []
    for ring_size in range(1, 9):
        p = problem(840, ring_size, causal, zigzag=False, dtype=torch.bfloat16)  # 840: divisible by 1 to 8
        for tensor in (p.q, p.k, p.v):
            tensor.requires_grad_()
        out = BUNDLED.get("ring").setup(p).run()
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        grads = torch.autograd.grad(out, (p.q, p.k, p.v), grad_out)
        errors.append(max(_relative(g, e) for g, e in zip(grads, dense_gradients(p, grad_out))))
    assert max(errors) <= GRADIENT_ERROR_GROWTH_BOUND * errors[0], errors
    assert errors[0] < correctness.TOLERANCE["bfloat16"]


def _backward_problem(headroom, transfers="nccl"):
    """Rank 0 of two, forward+backward at 128K tokens, bf16, B=1 H=16 D=128, with ``headroom`` bytes free."""
    options = {"kernel": "cudnn", "transfers": transfers, "zigzag": True}
    cell = Cell(
        "ring", tuple(sorted(options.items())), 1 << 17, 2, 1, 16, 128, "bfloat16", False, "forward+backward", 2
    )
    q = torch.empty(1, 16, 1 << 16, 128, dtype=torch.bfloat16, device="meta", requires_grad=True)
    return Problem.of(
        q, q, q, causal=False, ring_size=2, options=options, world_size=2, cell=cell, memory_headroom=headroom
    )


def _needs(part_heads):
    """What a rank needs with parts of ``part_heads``: its inputs (3 shards), its receive buffer (one K/V
    message, 2 shards) and the call, by the memory model."""
    problem = _backward_problem(None)
    call = ring.memory_model(problem.cell, {"kernel": "cudnn", "backward_part_heads": part_heads}, 1)
    return 5 * (256 << 20) + call


def _sums_buffer(part_heads):
    return 2 * part_heads * (1 << 16) * 128 * 2


@pytest.mark.parametrize(
    ("headroom", "transfers", "chosen"),
    [
        (None, "nccl", 2),  # unknown: the fewest heads that fill the GPU at 64K rows a rank
        (_needs(16) / ring.HEADROOM_SHARE + 1, "nccl", 16),
        (_needs(16) / ring.HEADROOM_SHARE - 1, "nccl", 8),
        (_needs(8) / ring.HEADROOM_SHARE - 1, "nccl", 4),
        (0, "nccl", 2),  # nothing fits: the fewest, to be tried
        # Copy-engine transfers keep the buffer a part's sums arrive in from setup: dK and dV of the
        # part's heads, bf16, in a ring of two; the call's model counts the arrival as NCCL's too.
        (_needs(16) / ring.HEADROOM_SHARE + 1, "copy-engine", 8),
        ((_needs(16) + _sums_buffer(16)) / ring.HEADROOM_SHARE + 1, "copy-engine", 16),
        (None, "copy-engine", 2),
    ],
)
def test_the_backward_goes_in_as_few_parts_as_the_memory_free_at_setup_allows(headroom, transfers, chosen, monkeypatch):
    problem = _backward_problem(headroom, transfers)
    problem.facts["kernel"] = "cudnn"
    registered = Registry.bundled().get("ring")
    assert ring.backward_part_heads(problem, 16, 1 << 16, registered.memory_model, registered.setup_memory) == chosen
    assert problem.facts["backward_part_heads"] == chosen


def test_the_memory_model_follows_the_parts_chosen():
    # One part: 4 shards (output, gradients) + 10 (README) + two float32 rows; 8 heads: 4 + 11 × 8/16.
    shard, rows = 256 << 20, 4 << 20
    cell = _backward_problem(None).cell
    assert ring.memory_model(cell, {"kernel": "cudnn", "backward_part_heads": 16}, 1) == 14 * shard + 2 * rows
    eight = ring.memory_model(cell, {"kernel": "cudnn", "backward_part_heads": 8}, 1)
    assert eight == 4 * shard + 11 * shard // 2 + rows + rows // 2
