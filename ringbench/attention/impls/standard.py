"""Textbook attention: matmul, softmax, matmul, materialising the full score matrix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ringbench.attention.models import forward_only
from ringbench.attention.registry import Problem, register
from ringbench.vocabulary import BASELINE, DTYPE_BYTES, PASSES, Cell


def _memory_model(cell: Cell, facts: Mapping[str, Any]) -> int:
    """Two S×S temporaries per head: the scores and their softmax."""
    return 2 * cell.batch_size * cell.heads * cell.seq_len**2 * DTYPE_BYTES[cell.dtype]


@register(
    "standard",
    memory_model=forward_only(_memory_model),
    passes=PASSES,
    roles=(BASELINE,),
    description="explicit matmul → softmax → matmul (materialises two S×S temporaries)",
)
def setup(problem: Problem):
    q, k, v = problem.q, problem.k, problem.v
    scale = q.shape[-1] ** -0.5
    seq_len = q.shape[-2]
    # Built once here, outside the timed region.
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1) if problem.causal else None

    def run() -> torch.Tensor:
        # The peak is exactly two S×S temporaries, the scores and the softmax output:
        # q (S×D) is scaled instead of the scores, and the scores are freed before the
        # output is allocated.
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
        if mask is not None:
            scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        return torch.matmul(probs, v)

    return run
