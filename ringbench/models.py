"""Modelled work and memory: the formulas measurements are compared with.

Conventions (per forward pass): dense attention does 4·B·H·Sq·Sk·D FLOPs (two
matrix products of 2·Sq·Sk·D each per head); causal attention counts half.
Memory models give bytes beyond the inputs at the peak of one call.
"""

from __future__ import annotations

from ringbench.plan import Cell

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def dense_flops(cell: Cell) -> float:
    flops = 4.0 * cell.batch_size * cell.heads * cell.seq_len**2 * cell.head_dim
    return flops / 2 if cell.causal else flops


def output_bytes(cell: Cell) -> int:
    """One (B, H, S, D) tensor in the cell's dtype."""
    return cell.batch_size * cell.heads * cell.seq_len * cell.head_dim * DTYPE_BYTES[cell.dtype]
