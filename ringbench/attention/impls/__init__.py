"""Bundled attention implementations; importing this package registers them."""

from ringbench.attention.impls import dilated, ring, sdpa, standard, torch_cp  # noqa: F401  (imported for registration)
