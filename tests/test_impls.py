import math

import pytest
import torch

from ringbench import Problem
from ringbench.attention.registry import Registry

BUNDLED = Registry.bundled()


def reference(q, k, v, causal):
    """Dense softmax attention in float64, written out elementwise-simple."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize(
    "name, options",
    [("standard", {}), ("sdpa", {"backend": "auto"}), ("sdpa", {"backend": "math"}), ("sdpa", {"backend": "flash"})],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [1, 37, 128])
def test_matches_float64_reference(name, options, causal, seq_len):
    generator = torch.Generator().manual_seed(seq_len)
    q, k, v = (torch.randn(2, 3, seq_len, 16, generator=generator) for _ in range(3))
    problem = Problem.of(q, k, v, causal=causal, ring_size=None, options=options)
    out = BUNDLED.get(name).setup(problem)()
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_sdpa_records_the_backend_it_ran():
    q = torch.randn(1, 2, 32, 16)
    explicit = Problem.of(q, q, q, causal=False, ring_size=None, options={"backend": "math"})
    BUNDLED.get("sdpa").setup(explicit)
    assert explicit.facts == {"kernel": "math"}
    auto = Problem.of(q, q, q, causal=False, ring_size=None, options={"backend": "auto"})
    BUNDLED.get("sdpa").setup(auto)
    assert auto.facts["kernel"] in {"flash", "efficient", "cudnn", "math"}


def test_unavailable_backend_fails_loudly_not_silently():
    q = torch.randn(1, 2, 32, 16)
    problem = Problem.of(q, q, q, causal=False, ring_size=None, options={"backend": "cudnn"})
    run = BUNDLED.get("sdpa").setup(problem)
    with pytest.raises(RuntimeError, match="No viable backend"):
        run()


def test_torch_cp_in_one_process_on_the_cpu_says_it_needs_cuda_and_opens_no_group():
    import torch.distributed as dist

    q = torch.randn(1, 2, 32, 16)
    options = BUNDLED.get("torch-cp").resolve_options({}, "torch-cp")
    problem = Problem.of(q, q, q, causal=False, ring_size=None, options=options)
    with pytest.raises(RuntimeError, match="^torch-cp needs CUDA devices"):
        BUNDLED.get("torch-cp").setup(problem)
    assert not dist.is_initialized()
