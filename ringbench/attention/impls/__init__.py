"""Bundled attention implementations."""

from ringbench.attention.impls import dilated, ring, sdpa, standard, torch_cp, ulysses, usp

# What Registry.bundled() collects.
MODULES = (standard, sdpa, ring, dilated, torch_cp, ulysses, usp)
