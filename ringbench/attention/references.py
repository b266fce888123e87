"""What an implementation's output is checked against: attention computed in float64,
softmax(q kᵀ/√d + bias) v, causal-masked when the cell is causal.

A :class:`Reference` supplies the bias; dense attention has none. An implementation
that computes something else — a sparse or dilated pattern, a score modification —
registers a subclass whose ``bias`` adds to the scores, with −inf where a query may
not see a key (a row that sees no key is 0). ``ringbench.run.correctness`` streams
outputs and gradients from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ringbench.attention.registry import Problem


class Reference:
    """Dense attention: nothing is added to the scores."""

    name = "dense"  # as records name the reference a cell was checked against

    def bias(self, problem: Problem, rows: torch.Tensor, keys: torch.Tensor, head: int) -> torch.Tensor | None:
        """float64 scores bias for head ``head`` at query positions ``rows`` and key positions ``keys``,
        shape (len(rows), len(keys)); None for none."""
        return None


DENSE = Reference()
