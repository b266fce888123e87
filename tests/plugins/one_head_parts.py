"""Imported as a plugin, makes every backward across processes that goes in parts of heads (ring's,
ulysses', usp's) go one head at a time at any sequence length, so that cells of a few dozen tokens
run a backward in several parts."""

from ringbench.attention import blocks

blocks.BACKWARD_PART_ROWS = 1
