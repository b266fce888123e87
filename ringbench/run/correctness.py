"""Checking an output against a float64 reference, before the cell is timed.

The reference is the implementation's registered :class:`Reference`:
softmax(q kᵀ/√d + bias) v, causal-masked when causal; a row that sees no key is 0.

The whole output is checked when the sequence is at most ``FULL_CHECK_MAX_SEQ``;
beyond that, a fixed-size random subset of query rows (seeded by the sweep's seed)
is checked against all keys. The error measure is the relative Frobenius error
‖out − ref‖ / ‖ref‖ over the checked rows; a cell passes when it is finite and at
most its tolerance: that of its dtype, or of the type the implementation
accumulates in where that is less precise (``tolerance``). The maximum absolute
error is recorded beside it.

For backward passes dq, dk and dv are also compared, each by the same relative
error, at every length: whole up to ``GRADIENT_FULL_MAX_SEQ``, on a sample beyond
it (see ``GradientSample``).

The reference never holds a whole input: it makes the rows it needs
(``ringbench.attention.inputs``) and streams K and V in blocks no longer than a
rank's shard, so a rank checks its rows with no other rank's data and no more
memory than its own inputs take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ringbench.attention.inputs import Positions
from ringbench.attention.references import Reference
from ringbench.attention.registry import Problem

TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
FULL_CHECK_MAX_SEQ = 4096
SUBSET_ROWS = 256
# float64 scores (every head) per block of keys in the streamed output reference: 32 MiB. Small
# beside a rank's inputs, since a cell's check runs within the memory its cell is allowed.
BLOCK_ELEMENTS = 2**22


def _biased(
    scores: torch.Tensor, reference: Reference, problem: Problem, rows: torch.Tensor, keys: torch.Tensor, head: int
) -> torch.Tensor:
    """Head ``head``'s float64 scores of ``rows`` against ``keys`` (the last two dimensions), with what the
    reference adds and the causal mask, in place: the check's memory stays that of the scores."""
    bias = reference.bias(problem, rows, keys, head)
    if bias is not None:
        scores += bias
    if problem.causal:
        scores.masked_fill_(keys.unsqueeze(0) > rows.unsqueeze(1), float("-inf"))
    return scores


def _spans(problem: Problem, length: int) -> list[range]:
    """The sequence's positions in blocks of at most ``length``, and never more than a rank's shard:
    the check holds no more of K and V at a time than the rank itself does."""
    seq_len = problem.seq_len
    length = max(1, min(length, -(-seq_len // problem.world_size)))
    return [range(start, min(seq_len, start + length)) for start in range(0, seq_len, length)]


def _positions(span: range, device: torch.device) -> torch.Tensor:
    return torch.arange(span.start, span.stop, device=device)


class _Softmax:
    """Softmax-weighted sums over key blocks, kept online (float64): per row the running maximum
    score m, Σ exp(s − m) and Σ exp(s − m)·x for each summed quantity x."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.top = torch.full(shape, float("-inf"), dtype=torch.float64, device=device)
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)

    def weights(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """exp(scores − m') for a new block, made in place of ``scores``, and the factor that rescales
        sums so far to m'."""
        top = torch.maximum(self.top, scores.amax(-1))
        finite = torch.where(torch.isfinite(top), top, 0.0)  # a row that has seen no key yet
        rescale, self.top = torch.exp(self.top - finite), top
        weights = scores.sub_(finite.unsqueeze(-1)).exp_()
        self.total = self.total * rescale + weights.sum(-1)
        return weights, rescale

    def normalised(self, sums: torch.Tensor) -> torch.Tensor:
        """Σ p·x from Σ exp(s − m)·x; 0 for a row that sees no key."""
        total = self.total.unsqueeze(-1) if sums.dim() > self.total.dim() else self.total
        return torch.where(total > 0, sums / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)

    def lse(self) -> torch.Tensor:
        return self.top + self.total.log()  # −inf for a row that sees no key


@torch.no_grad()
def reference_rows(reference: Reference, problem: Problem, rows: torch.Tensor) -> torch.Tensor:
    """The reference output at ``rows`` (all heads and batches), float64, shape (B, H, R, D), with K and V
    streamed in blocks."""
    inputs = problem.inputs
    q = inputs.rows("q", rows).double() * inputs.shape[3] ** -0.5
    softmax = _Softmax(q.shape[:-1], q.device)
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    batch, heads = inputs.shape[:2]
    for span in _spans(problem, BLOCK_ELEMENTS // (batch * heads * max(1, len(rows)))):
        keys = _positions(span, problem.device)
        k, v = (inputs.rows(name, span).double() for name in "kv")
        scores = q @ k.transpose(-1, -2)
        for head in range(heads):
            _biased(scores[:, head], reference, problem, rows, keys, head)
        weights, rescale = softmax.weights(scores)
        out = out * rescale.unsqueeze(-1) + weights @ v
    return softmax.normalised(out)


def check_rows(seq_len: int, seed: int, device: torch.device) -> torch.Tensor:
    if seq_len <= FULL_CHECK_MAX_SEQ:
        return torch.arange(seq_len, device=device)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(seq_len, generator=generator)[:SUBSET_ROWS].sort().values.to(device)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Sums:
    """What one process found checking the rows it holds: Σ(out − ref)², Σref², max |out − ref| and
    the rows checked; for backward passes also Σ(g − ref)² and Σref² of dq, dk and dv in turn.
    Sums add and maxima combine across the ranks of a process group."""

    squared_error: float = 0.0
    squared_reference: float = 0.0
    max_abs: float = 0.0
    rows: int = 0
    gradients: tuple[float, ...] | None = None

    @staticmethod
    def combine(parts: list[Sums]) -> Sums:
        gradients = [part.gradients for part in parts if part.gradients is not None]
        return Sums(
            sum(part.squared_error for part in parts),
            sum(part.squared_reference for part in parts),
            max(part.max_abs for part in parts),
            sum(part.rows for part in parts),
            tuple(map(sum, zip(*gradients))) if gradients else None,
        )


def partial_errors(
    reference: Reference, problem: Problem, output: torch.Tensor, output_rows: torch.Tensor | None, seed: int
) -> Sums:
    """The output's errors over the checked rows this process holds.

    ``output_rows`` are the sequence positions of ``output``'s rows (None: all, in order).
    """
    seq_len, device = problem.seq_len, problem.device
    held = torch.arange(seq_len, device=device) if output_rows is None else output_rows
    wanted = torch.isin(held, check_rows(seq_len, seed, device))
    rows = held[wanted]
    if len(rows) == 0:
        return Sums()
    expected = reference_rows(reference, problem, rows)
    difference = output[:, :, wanted].double() - expected
    return Sums(difference.pow(2).sum().item(), expected.pow(2).sum().item(), difference.abs().max().item(), len(rows))


def tolerance(dtype: str, accumulates: str | None) -> float:
    """The relative error a cell may reach: its dtype's, or that of the type the implementation
    accumulates in (declared at registration) where that is the less precise."""
    own = TOLERANCE[dtype]
    return own if accumulates is None else max(own, TOLERANCE[accumulates])


def verdict(reference: Reference, sums: Sums, tolerance: float, sample: GradientSample | None) -> dict[str, Any]:
    """The check's record from (combined) sums; with the gradients' where they were checked, on ``sample``."""
    relative = math.sqrt(sums.squared_error / sums.squared_reference) if sums.squared_reference > 0 else sums.max_abs
    found = {
        "reference": reference.name,
        "rows_checked": sums.rows,
        "max_abs_error": _finite_or_none(sums.max_abs),
        "rel_error": _finite_or_none(relative),
        "tolerance": tolerance,
        "passed": math.isfinite(relative) and relative <= tolerance,
    }
    if sums.gradients is None:
        return found
    assert sample is not None, "gradients are sampled wherever they are checked"
    gradients = gradient_verdict(sums.gradients, tolerance, sample)
    return {**found, "gradients": gradients, "passed": found["passed"] and gradients["passed"]}


GRADIENTS = ("dq", "dk", "dv")
# Up to this length every row of every (batch, head) is checked; beyond it a sample.
GRADIENT_FULL_MAX_SEQ = 8192
GRADIENT_SAMPLE_ROWS = 256
# The streamed gradient reference takes one head's scores in blocks of query rows × keys: float64,
# 128 MiB, and at most one more as large (dO·Vᵀ; the rest is made in place). Smaller blocks leave
# the GPU waiting on kernel launches: in blocks of 2048, not in place, a forward+backward cell's
# check took 1.5–2.1× as long at 128K and 256K tokens on an H200 (results/evidence, check-cost).
QUERY_BLOCK = KEY_BLOCK = 4096


@dataclass(frozen=True)
class GradientSample:
    """Where gradients are checked: (batch, head) pairs, query rows for dq, key rows for dk and dv.

    Whole up to ``GRADIENT_FULL_MAX_SEQ``. Beyond it, the first and the last (batch, head)
    — the last head has a non-zero offset in every dilated pattern with r > 1 — and
    ``GRADIENT_SAMPLE_ROWS`` query rows and as many key rows drawn with the sweep's seed:
    a key's gradient sums over every query row, so the reference still streams over
    all of them, which bounds the cost by 2·S²·D per pair checked.
    """

    pairs: tuple[tuple[int, int], ...]
    q_rows: torch.Tensor
    k_rows: torch.Tensor

    @classmethod
    def of(cls, shape: tuple[int, ...], device: torch.device, seed: int) -> GradientSample:
        batch, heads, seq_len = shape[:3]
        if seq_len <= GRADIENT_FULL_MAX_SEQ:
            every = torch.arange(seq_len, device=device)
            return cls(tuple((b, h) for b in range(batch) for h in range(heads)), every, every)
        draw = torch.Generator().manual_seed(seed + 2)
        q_rows, k_rows = (
            torch.randperm(seq_len, generator=draw)[:GRADIENT_SAMPLE_ROWS].sort().values.to(device) for _ in range(2)
        )
        return cls(tuple(dict.fromkeys([(0, 0), (batch - 1, heads - 1)])), q_rows, k_rows)


@torch.no_grad()
def reference_gradients(
    reference: Reference, problem: Problem, batch: int, head: int, q_rows: torch.Tensor, k_rows: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """float64 dq at ``q_rows`` and dk, dv at ``k_rows`` of one (batch, head), for the output gradient
    of the problem's inputs, every tensor made in blocks.

    With P = softmax(scores + bias), O = P·V and Δ = rowsum(dO ∘ O) = Σⱼ Pᵢⱼ (dOᵢ·vⱼ):
    dS = P ∘ (dO·Vᵀ − Δ), dQ = dS·K·scale, dK = dSᵀ·Q·scale, dV = Pᵀ·dO.
    First every row's log-sum-exp and Δ (a key's gradient sums over every query row),
    streaming K and V for blocks of query rows; then dK and dV at ``k_rows`` over those
    blocks, and dQ at ``q_rows`` over blocks of keys. A row no key may see has output 0
    and no gradient.
    """
    head_rows = problem.inputs.head_rows
    seq_len, head_dim = problem.inputs.shape[2:]
    scale = head_dim**-0.5
    key_spans = _spans(problem, KEY_BLOCK)
    query_spans = [range(start, min(seq_len, start + QUERY_BLOCK)) for start in range(0, seq_len, QUERY_BLOCK)]

    def seen(first_key: int, last_row: int) -> bool:
        """Whether a query block whose last row is ``last_row`` sees a key block that starts at
        ``first_key``. Under the causal mask a block of keys after every row adds nothing to any
        sum, so skipping it leaves every result as it was, and takes about half the work off a causal check."""
        return not problem.causal or first_key <= last_row

    def part(name: str, rows: Positions) -> torch.Tensor:
        return head_rows(name, batch, head, rows).double()

    def scaled_q(rows: Positions) -> torch.Tensor:
        return part("q", rows) * scale

    def probabilities(rows, keys, q, k, lse):
        """P at ``rows`` × ``keys``, from ``q`` already scaled."""
        scores = _biased(q @ k.T, reference, problem, rows, keys, head)
        return scores.sub_(torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1)).exp_()  # 0 where −inf

    lse = torch.empty(seq_len, dtype=torch.float64, device=problem.device)
    delta = torch.empty_like(lse)
    for query_span in query_spans:
        rows = _positions(query_span, problem.device)
        q, d_out = scaled_q(query_span), part("dout", query_span)
        softmax = _Softmax((len(rows),), q.device)
        weighted = torch.zeros(len(rows), dtype=torch.float64, device=q.device)
        for key_span in key_spans:
            if not seen(key_span.start, query_span.stop - 1):
                continue
            keys = _positions(key_span, problem.device)
            weights, rescale = softmax.weights(_biased(q @ part("k", key_span).T, reference, problem, rows, keys, head))
            weighted = weighted * rescale + (d_out @ part("v", key_span).T).mul_(weights).sum(-1)
        lse[rows], delta[rows] = softmax.lse(), softmax.normalised(weighted)

    k_sampled, v_sampled = part("k", k_rows), part("v", k_rows)
    first_sampled_key = int(k_rows.min())
    dk, dv = (torch.zeros(len(k_rows), head_dim, dtype=torch.float64, device=problem.device) for _ in range(2))
    for query_span in query_spans:
        if not seen(first_sampled_key, query_span.stop - 1):
            continue
        rows = _positions(query_span, problem.device)
        q, d_out = scaled_q(query_span), part("dout", query_span)
        probs = probabilities(rows, k_rows, q, k_sampled, lse[rows])
        dv += probs.T @ d_out
        dk += (d_out @ v_sampled.T).sub_(delta[rows].unsqueeze(-1)).mul_(probs).T @ q

    q, d_out = scaled_q(q_rows), part("dout", q_rows)
    last_sampled_row = int(q_rows.max())
    dq = torch.zeros(len(q_rows), head_dim, dtype=torch.float64, device=problem.device)
    for key_span in key_spans:
        if not seen(key_span.start, last_sampled_row):
            continue
        keys = _positions(key_span, problem.device)
        k, v = part("k", key_span), part("v", key_span)
        probs = probabilities(q_rows, keys, q, k, lse[q_rows])
        dq += (d_out @ v.T).sub_(delta[q_rows].unsqueeze(-1)).mul_(probs) @ k * scale
    return dq, dk, dv


def gradient_partials(
    reference: Reference, problem: Problem, grads: tuple[torch.Tensor, ...], seed: int, rows: torch.Tensor | None = None
) -> tuple[float, ...]:
    """[Σ(g − ref)², Σref²] for dq, dk and dv in turn, over the entries of ``GradientSample``
    this process holds, against the float64 reference.

    ``grads`` are for the inputs' own output gradient (``dout``); ``rows`` are the
    sequence positions of the rows ``grads`` hold (None: all, in order), so the sums
    of the ranks of a process group add up to the whole.
    """
    seq_len = problem.seq_len
    device = problem.device
    sample = GradientSample.of(problem.inputs.shape, device, seed)
    place = torch.full((seq_len,), -1, dtype=torch.long, device=device)  # sequence position → row of grads
    held = torch.arange(seq_len, device=device) if rows is None else rows
    place[held] = torch.arange(len(held), device=device)
    sums = [0.0] * (2 * len(GRADIENTS))
    for b, h in sample.pairs:
        expected_grads = reference_gradients(reference, problem, b, h, sample.q_rows, sample.k_rows)
        for index, (grad, sampled, expected) in enumerate(
            zip(grads, (sample.q_rows, sample.k_rows, sample.k_rows), expected_grads)
        ):
            local = place[sampled]
            mine = local >= 0
            value = grad[b, h, local[mine]].double()
            sums[2 * index] += (value - expected[mine]).pow(2).sum().item()
            sums[2 * index + 1] += expected[mine].pow(2).sum().item()
    return tuple(sums)


def gradient_verdict(partials: tuple[float, ...], tolerance: float, sample: GradientSample) -> dict[str, Any]:
    """The gradient check's record from (combined) partial sums; each gradient by its relative error."""
    errors = {}
    for index, name in enumerate(GRADIENTS):
        error, norm = partials[2 * index], partials[2 * index + 1]
        errors[name] = math.sqrt(error / norm) if norm > 0 else math.sqrt(error)
    worst = max(errors.values())
    return {
        "checked": True,
        "heads_checked": len(sample.pairs),
        "rows_checked": len(sample.q_rows),
        **{f"{name}_rel_error": _finite_or_none(e) for name, e in errors.items()},
        "rel_error": _finite_or_none(worst),
        "passed": math.isfinite(worst) and worst <= tolerance,
    }
