"""PyTorch's fused ``scaled_dot_product_attention`` with a selectable backend."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringbench.attention.models import output_bytes
from ringbench.attention.registry import Option, Problem, register
from ringbench.vocabulary import PASSES, PEER

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
_NAMES = {backend: name for name, backend in BACKENDS.items()}


def kernel_choice(backend: str):
    """A fresh context manager (each is good for one ``with``) pinning SDPA to ``backend``."""
    return contextlib.nullcontext() if backend == "auto" else sdpa_kernel(BACKENDS[backend])


def resolved_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str:
    """The kernel ``backend`` stands for; for auto, the one SDPA's dispatcher picks (private API, so guarded)."""
    if backend != "auto":
        return backend
    try:
        chosen = torch._fused_sdp_choice(q, k, v, is_causal=causal)
        return _NAMES.get(SDPBackend(chosen), "unknown")
    except Exception:  # the private dispatcher query may vanish or change signature
        return "unknown"


@register(
    "sdpa",
    options={"backend": Option("auto", choices=("auto", *BACKENDS), help="SDPA kernel; auto lets PyTorch choose")},
    memory_model=lambda cell, facts: output_bytes(cell),  # fused kernels keep no S×S state: only the output
    passes=PASSES,
    roles=(PEER,),
    description="torch.nn.functional.scaled_dot_product_attention",
)
def setup(problem: Problem):
    q, k, v, causal = problem.q, problem.k, problem.v, problem.causal
    backend = problem.options["backend"]
    problem.facts["kernel"] = resolved_backend(backend, q, k, v, causal)

    def run() -> torch.Tensor:
        with kernel_choice(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run
