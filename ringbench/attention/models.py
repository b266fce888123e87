"""Modelled work and memory: the formulas measurements are compared with.

Conventions: a dense forward pass does 4·B·H·Sq·Sk·D FLOPs (two matrix products
of 2·Sq·Sk·D each per head); causal attention counts half; other passes scale the
forward count by ``PASS_FACTOR``.
Memory models give the bytes a call allocates beyond what it starts with (the inputs,
the output gradient of backward passes, the buffers setup keeps), at its peak, per rank:
for the pass the cell names, or None where the implementation does not model it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ringbench.vocabulary import DTYPE_BYTES, Cell

MemoryModel = Callable[[Cell, Mapping[str, Any]], "int | None"]
# The kernels whose backward keeps only the gradients and a float32 dQ accumulator (the
# fused ones ringbench runs backward on); with them a forward+backward call is modelled.
FUSED_BACKWARD = ("cudnn", "flash")

# Backward does 2.5 times the forward's work (two more matrix products per block,
# plus recomputing the scores); a training step does both.
PASS_FACTOR = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}


def dense_flops(cell: Cell) -> float:
    flops = 4.0 * cell.batch_size * cell.heads * cell.seq_len**2 * cell.head_dim
    return flops / 2 if cell.causal else flops


def output_bytes(cell: Cell) -> int:
    """One (B, H, S, D) tensor in the cell's dtype."""
    return cell.batch_size * cell.heads * cell.seq_len * cell.head_dim * DTYPE_BYTES[cell.dtype]


def shard_bytes(cell: Cell) -> int:
    """One rank's share of one (B, H, S, D) tensor: N in the models' docstrings."""
    return output_bytes(cell) // cell.world_size


def row_floats(cell: Cell) -> int:
    """One float32 per query row a rank holds (a log-sum-exp, say), in bytes."""
    return cell.batch_size * cell.heads * cell.seq_len // cell.world_size * 4


def forward_only(model: Callable[[Cell, Mapping[str, Any]], int]) -> MemoryModel:
    """A model of forward calls only: passes with a backward are not modelled."""
    return lambda cell, facts: model(cell, facts) if cell.pass_name == "forward" else None


def fused_backward(facts: Mapping[str, Any]) -> bool:
    """Whether the kernel setup chose (none yet, before setup: assumed) keeps only what
    ``FUSED_BACKWARD`` kernels keep in backward."""
    return facts.get("kernel", FUSED_BACKWARD[0]) in FUSED_BACKWARD
