"""Imported as a plugin, makes ulysses' backward go one head at a time at any sequence length, so
that cells of a few dozen tokens run a backward in several parts."""

from ringbench.attention.impls import ulysses

ulysses.BACKWARD_PART_ROWS = 1
