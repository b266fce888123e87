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
error, with a float64 reference streamed over blocks of query rows on the device,
at every length: whole up to ``GRADIENT_FULL_MAX_SEQ``, on a sample beyond it
(see ``GradientSample``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ringbench.attention.references import Reference
from ringbench.attention.registry import Problem

TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
FULL_CHECK_MAX_SEQ = 4096
SUBSET_ROWS = 256


def _bias(reference: Reference, problem: Problem, rows: torch.Tensor, head: int) -> torch.Tensor:
    """What the reference adds to head ``head``'s scores at ``rows``, and the causal mask."""
    seq_len = problem.q.shape[2]
    bias = reference.bias(problem, rows, head)
    if bias is None:
        bias = torch.zeros(len(rows), seq_len, dtype=torch.float64, device=rows.device)
    if problem.causal:
        keys = torch.arange(seq_len, device=rows.device)
        bias = bias.masked_fill(keys.unsqueeze(0) > rows.unsqueeze(1), float("-inf"))
    return bias


@torch.no_grad()
def reference_rows(reference: Reference, problem: Problem, rows: torch.Tensor) -> torch.Tensor:
    """The reference output at ``rows`` (all heads and batches), float64, shape (B, H, R, D)."""
    q, k, v = problem.q, problem.k, problem.v
    batch, heads, seq_len, head_dim = q.shape
    out = torch.empty(batch, heads, len(rows), head_dim, dtype=torch.float64, device=q.device)
    for h in range(heads):  # one head at a time bounds the float64 scores to R × S
        bias = _bias(reference, problem, rows, h)
        for b in range(batch):
            scores = q[b, h, rows].double() @ k[b, h].double().T / math.sqrt(head_dim) + bias
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key at all give 0
            out[b, h] = probs @ v[b, h].double()
    return out


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
    seq_len = problem.q.shape[2]
    device = problem.q.device
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
# float64 scores per block of query rows in the streamed reference: 128 MiB, plus as much for probabilities.
BLOCK_ELEMENTS = 2**24


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
    def of(cls, q: torch.Tensor, seed: int) -> GradientSample:
        batch, heads, seq_len = q.shape[:3]
        if seq_len <= GRADIENT_FULL_MAX_SEQ:
            every = torch.arange(seq_len, device=q.device)
            return cls(tuple((b, h) for b in range(batch) for h in range(heads)), every, every)
        draw = torch.Generator().manual_seed(seed + 2)
        q_rows, k_rows = (
            torch.randperm(seq_len, generator=draw)[:GRADIENT_SAMPLE_ROWS].sort().values.to(q.device) for _ in range(2)
        )
        return cls(tuple(dict.fromkeys([(0, 0), (batch - 1, heads - 1)])), q_rows, k_rows)


@torch.no_grad()
def reference_gradients(
    reference: Reference,
    problem: Problem,
    batch: int,
    head: int,
    dout: torch.Tensor,
    q_rows: torch.Tensor,
    k_rows: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """float64 dq at ``q_rows`` and dk, dv at ``k_rows`` of one (batch, head), streamed over
    blocks of query rows; ``dout`` is that head's output gradient, (S, D).

    With P = softmax(scores + bias), O = P·V and Δ = rowsum(dO ∘ O):
    dS = P ∘ (dO·Vᵀ − Δ), dQ = dS·K·scale, dK = dSᵀ·Q·scale, dV = Pᵀ·dO.
    A row no key may see has output 0 and no gradient.
    """
    q, k, v = (t[batch, head].double() for t in (problem.q, problem.k, problem.v))
    seq_len, head_dim = q.shape
    scale = head_dim**-0.5
    dq = torch.zeros(len(q_rows), head_dim, dtype=torch.float64, device=q.device)
    dk, dv = (torch.zeros(len(k_rows), head_dim, dtype=torch.float64, device=q.device) for _ in range(2))
    v_sampled = v[k_rows]
    rows_per_block = max(1, BLOCK_ELEMENTS // seq_len)
    for start in range(0, seq_len, rows_per_block):
        rows = torch.arange(start, min(seq_len, start + rows_per_block), device=q.device)
        bias = _bias(reference, problem, rows, head)
        seen = torch.isfinite(bias).any(-1, keepdim=True)
        probs = torch.softmax(q[rows] @ k.T * scale + bias.masked_fill(~seen, 0.0), -1) * seen  # (R, S)
        d_out = dout[rows].double()
        delta = (d_out * (probs @ v)).sum(-1, keepdim=True)  # (R, 1)
        columns = probs[:, k_rows]  # (R, sampled keys)
        dk += (columns * (d_out @ v_sampled.T - delta)).T @ q[rows] * scale
        dv += columns.T @ d_out
        inside = (q_rows >= rows[0]) & (q_rows <= rows[-1])
        if inside.any():
            local = q_rows[inside] - start
            dq[inside] = (probs[local] * (d_out[local] @ v.T - delta[local])) @ k * scale
    return dq, dk, dv


def gradient_partials(
    reference: Reference,
    problem: Problem,
    grads: tuple[torch.Tensor, ...],
    grad_out: torch.Tensor,
    seed: int,
    rows: torch.Tensor | None = None,
) -> tuple[float, ...]:
    """[Σ(g − ref)², Σref²] for dq, dk and dv in turn, over the entries of ``GradientSample``
    this process holds, against the float64 reference.

    ``grad_out`` is the gradient of the whole output; ``rows`` are the sequence
    positions of the rows ``grads`` hold (None: all, in order), so the sums of the
    ranks of a process group add up to the whole.
    """
    seq_len = problem.q.shape[2]
    device = problem.q.device
    sample = GradientSample.of(problem.q, seed)
    place = torch.full((seq_len,), -1, dtype=torch.long, device=device)  # sequence position → row of grads
    held = torch.arange(seq_len, device=device) if rows is None else rows
    place[held] = torch.arange(len(held), device=device)
    sums = [0.0] * (2 * len(GRADIENTS))
    for b, h in sample.pairs:
        expected_grads = reference_gradients(reference, problem, b, h, grad_out[b, h], sample.q_rows, sample.k_rows)
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
