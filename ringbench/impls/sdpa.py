"""PyTorch's fused ``scaled_dot_product_attention`` with a selectable backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringbench.config import PASSES
from ringbench.models import output_bytes
from ringbench.registry import Option, Problem, register

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
_NAMES = {backend: name for name, backend in BACKENDS.items()}


def _auto_choice(problem: Problem) -> str:
    """The kernel SDPA's own dispatcher picks for these inputs (private API, so guarded)."""
    try:
        chosen = torch._fused_sdp_choice(problem.q, problem.k, problem.v, is_causal=problem.causal)
        return _NAMES.get(SDPBackend(chosen), "unknown")
    except Exception:  # the private dispatcher query may vanish or change signature
        return "unknown"


@register(
    "sdpa",
    options={"backend": Option("auto", choices=("auto", *BACKENDS), help="SDPA kernel; auto lets PyTorch choose")},
    memory_model=output_bytes,  # fused kernels keep no S×S state: only the output is new
    passes=PASSES,
    description="torch.nn.functional.scaled_dot_product_attention",
)
def setup(problem: Problem):
    q, k, v, causal = problem.q, problem.k, problem.v, problem.causal
    backend = problem.options["backend"]
    problem.facts["backend"] = _auto_choice(problem) if backend == "auto" else backend

    if backend == "auto":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    kernel = BACKENDS[backend]

    def run() -> torch.Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run
