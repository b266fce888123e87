"""Checking an output against a float64 reference, before the cell is timed.

References, by family:
- ``dense``: softmax(q kᵀ/√d) v, causal-masked when causal.
- ``dilated``: the same with log(number of patterns covering (q, k)) added to each
  score and −inf where no pattern covers the pair; a row no pattern selects is 0.

The whole output is checked when the sequence is at most ``FULL_CHECK_MAX_SEQ``;
beyond that, a fixed-size random subset of query rows (seeded by the sweep's seed)
is checked against all keys. The error measure is the relative Frobenius error
‖out − ref‖ / ‖ref‖ over the checked rows; a cell passes when it is finite and at
most ``TOLERANCE[dtype]``. The maximum absolute error is recorded beside it.

For backward passes dq, dk and dv are also compared, each by the same relative
error, with float64 autograd through dense attention (see ``check_gradients``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ringbench.impls.dilated import patterns
from ringbench.registry import Problem

TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
FULL_CHECK_MAX_SEQ = 4096
SUBSET_ROWS = 256
GRADIENT_CHECK_MAX_SEQ = 8192


def _coverage_log(rows: torch.Tensor, seq_len: int, head: int, options: dict) -> torch.Tensor:
    """log(number of dilated patterns covering each (row, key) pair), −inf where none do."""
    keys = torch.arange(seq_len, device=rows.device)
    count = torch.zeros(len(rows), seq_len, dtype=torch.float64, device=rows.device)
    for w, r in patterns(options, seq_len):
        offset = head % r
        same_segment = (rows // w).unsqueeze(1) == (keys // w).unsqueeze(0)
        row_kept = ((rows % w) % r == offset).unsqueeze(1)
        key_kept = ((keys % w) % r == offset).unsqueeze(0)
        count += (same_segment & row_kept & key_kept).double()
    return count.log()


def _bias(family: str, problem: Problem, rows: torch.Tensor, head: int) -> torch.Tensor:
    """What the family adds to head ``head``'s scores at ``rows``: the dilated coverage, the causal mask."""
    seq_len = problem.q.shape[2]
    bias = torch.zeros(len(rows), seq_len, dtype=torch.float64, device=rows.device)
    if family == "dilated":
        bias = _coverage_log(rows, seq_len, head, dict(problem.options))
    if problem.causal:
        keys = torch.arange(seq_len, device=rows.device)
        bias = bias.masked_fill(keys.unsqueeze(0) > rows.unsqueeze(1), float("-inf"))
    return bias


@torch.no_grad()
def reference_rows(family: str, problem: Problem, rows: torch.Tensor) -> torch.Tensor:
    """The reference output at ``rows`` (all heads and batches), float64, shape (B, H, R, D)."""
    q, k, v = problem.q, problem.k, problem.v
    batch, heads, seq_len, head_dim = q.shape
    out = torch.empty(batch, heads, len(rows), head_dim, dtype=torch.float64, device=q.device)
    for h in range(heads):  # one head at a time bounds the float64 scores to R × S
        bias = _bias(family, problem, rows, h)
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


def partial_errors(family: str, problem: Problem, output: torch.Tensor, output_rows: torch.Tensor | None,
                   seed: int) -> list[float]:
    """[Σ(out − ref)², Σref², max |out − ref|, rows checked] over the checked rows this process holds.

    ``output_rows`` are the sequence positions of ``output``'s rows (None: all, in
    order). Sums add and maxima combine across the ranks of a process group.
    """
    seq_len = problem.q.shape[2]
    device = problem.q.device
    held = torch.arange(seq_len, device=device) if output_rows is None else output_rows
    wanted = torch.isin(held, check_rows(seq_len, seed, device))
    rows = held[wanted]
    if len(rows) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    reference = reference_rows(family, problem, rows)
    difference = output[:, :, wanted].double() - reference
    return [difference.pow(2).sum().item(), reference.pow(2).sum().item(), difference.abs().max().item(),
            float(len(rows))]


def verdict(family: str, partials: list[float], dtype: str) -> dict[str, Any]:
    """The check's record from (combined) partial errors."""
    squared_error, squared_reference, max_abs, rows = partials
    relative = math.sqrt(squared_error / squared_reference) if squared_reference > 0 else max_abs
    tolerance = TOLERANCE[dtype]
    return {
        "reference": family,
        "rows_checked": int(rows),
        "max_abs_error": _finite_or_none(max_abs),
        "rel_error": _finite_or_none(relative),
        "tolerance": tolerance,
        "passed": math.isfinite(relative) and relative <= tolerance,
    }


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    norm = reference.norm().item()
    error = (value.double() - reference).norm().item()
    return error / norm if norm > 0 else error


GRADIENTS = ("dq", "dk", "dv")


def gradient_partials(family: str, problem: Problem, grads: tuple[torch.Tensor, ...], grad_out: torch.Tensor,
                      rows: torch.Tensor | None = None) -> list[float] | None:
    """[Σ(g − ref)², Σref²] for dq, dk and dv in turn, against float64 autograd through the family's reference.

    ``grad_out`` is the gradient of the whole output; ``rows`` are the sequence
    positions of the rows ``grads`` hold (None: all, in order), so the sums of the
    ranks of a process group add up to the whole. Gradients of a key depend on
    every query row, so no row subset will do: None (not checked) for sequences
    above ``GRADIENT_CHECK_MAX_SEQ``.
    """
    seq_len = problem.q.shape[2]
    if seq_len > GRADIENT_CHECK_MAX_SEQ:
        return None
    sums = [0.0] * (2 * len(GRADIENTS))
    every = torch.arange(seq_len, device=problem.q.device)
    for h in range(problem.q.shape[1]):
        bias = _bias(family, problem, every, h)
        # A row no key may see has output 0 and no gradient (softmax over nothing is undefined).
        seen = torch.isfinite(bias).any(-1, keepdim=True)
        bias = bias.masked_fill(~seen, 0.0)
        for b in range(problem.q.shape[0]):
            q, k, v = (t[b, h].detach().double().requires_grad_() for t in (problem.q, problem.k, problem.v))
            output = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]) + bias, -1) @ v * seen
            reference = torch.autograd.grad(output, (q, k, v), grad_out[b, h].double())
            for index, (value, expected) in enumerate(zip((g[b, h] for g in grads), reference)):
                expected = expected if rows is None else expected[rows]
                sums[2 * index] += (value.double() - expected).pow(2).sum().item()
                sums[2 * index + 1] += expected.pow(2).sum().item()
    return sums


def gradient_verdict(partials: list[float] | None, dtype: str) -> dict[str, Any]:
    """The gradient check's record from (combined) partial sums; each gradient by its relative error."""
    if partials is None:
        return {"checked": False, "reason": f"seq_len above {GRADIENT_CHECK_MAX_SEQ}", "passed": True}
    errors = {}
    for index, name in enumerate(GRADIENTS):
        error, norm = partials[2 * index], partials[2 * index + 1]
        errors[name] = math.sqrt(error / norm) if norm > 0 else math.sqrt(error)
    worst = max(errors.values())
    return {"checked": True, **{f"{name}_rel_error": _finite_or_none(e) for name, e in errors.items()},
            "rel_error": _finite_or_none(worst), "passed": math.isfinite(worst) and worst <= TOLERANCE[dtype]}


def check_gradients(family: str, problem: Problem, grads: tuple[torch.Tensor, ...], grad_out: torch.Tensor,
                    dtype: str) -> dict[str, Any]:
    """dq, dk, dv of one process (all rows) against the float64 reference."""
    return gradient_verdict(gradient_partials(family, problem, grads, grad_out), dtype)


def check(family: str, problem: Problem, output: torch.Tensor, dtype: str, seed: int) -> dict[str, Any]:
    """Compare a whole output (all rows, in order) with the family's reference."""
    return verdict(family, partial_errors(family, problem, output, None, seed), dtype)
