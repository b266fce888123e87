"""PyTorch's fused ``scaled_dot_product_attention`` with a selectable backend."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringbench.attention.models import fused_backward, output_bytes, row_floats
from ringbench.attention.registry import Option, Problem, register
from ringbench.vocabulary import PASSES, PEER, Cell

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


def _memory_model(cell: Cell, facts: Mapping[str, Any]) -> int | None:
    """Forward: the output (fused kernels keep no S×S state). Forward+backward: the output (the
    call differentiates it, so it lives on), dq, dk and dv, the kernel's float32 dQ accumulator (two
    tensors' worth), and two float32 per row, the log-sum-exp and rowsum(dO∘O)."""
    if cell.pass_name == "forward":
        return output_bytes(cell)
    if cell.pass_name == "forward+backward" and fused_backward(facts):
        return 6 * output_bytes(cell) + 2 * row_floats(cell)
    return None


@register(
    "sdpa",
    options={"backend": Option("auto", choices=("auto", *BACKENDS), help="SDPA kernel; auto lets PyTorch choose")},
    memory_model=_memory_model,
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
