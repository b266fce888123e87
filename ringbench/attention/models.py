"""Modelled work and memory: the formulas measurements are compared with.

Conventions: a dense forward pass does 4·B·H·Sq·Sk·D FLOPs (two matrix products
of 2·Sq·Sk·D each per head); causal attention counts half; other passes scale the
forward count by ``PASS_FACTOR``.
Memory models give bytes beyond the inputs at the peak of one call.
"""

from __future__ import annotations

from ringbench.vocabulary import DTYPE_BYTES, Cell

# Backward does 2.5 times the forward's work (two more matrix products per block,
# plus recomputing the scores); a training step does both.
PASS_FACTOR = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}


def dense_flops(cell: Cell) -> float:
    flops = 4.0 * cell.batch_size * cell.heads * cell.seq_len**2 * cell.head_dim
    return flops / 2 if cell.causal else flops


def output_bytes(cell: Cell) -> int:
    """One (B, H, S, D) tensor in the cell's dtype."""
    return cell.batch_size * cell.heads * cell.seq_len * cell.head_dim * DTYPE_BYTES[cell.dtype]
