"""One H200, bf16, B=1 H=16 D=128, cuDNN forward, non-causal: the block kernel's time with the
log-sum-exp against SDPA's public call without it, per block shape (query rows × keys), and the
same block cut in two calls by heads or by query rows. Interleaved call by call; medians of
CUDA-event times over REPS calls of each, after WARM calls of each."""

import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringbench.attention import blocks

REPS, WARM = int(sys.argv[1]) if len(sys.argv) > 1 else 20, 3
dev = torch.device("cuda", 0)


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    return start, end


K = 1024
for rows, keys in ((16 * K, 16 * K), (32 * K, 32 * K), (64 * K, 64 * K), (128 * K, 128 * K), (64 * K, 32 * K), (32 * K, 64 * K)):
    q = torch.randn(1, 16, rows, 128, dtype=torch.bfloat16, device=dev)
    k, v = (torch.randn(1, 16, keys, 128, dtype=torch.bfloat16, device=dev) for _ in range(2))

    def plain():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    variants = {
        "sdpa": plain,
        "lse": lambda: blocks.attend("cudnn", q, k, v, False),
        "lse by heads": lambda: [blocks.attend("cudnn", q[:, h : h + 8], k[:, h : h + 8], v[:, h : h + 8], False) for h in (0, 8)],
        "lse by rows": lambda: [blocks.attend("cudnn", q[:, :, r : r + rows // 2], k, v, False) for r in (0, rows // 2)],
    }
    for fn in variants.values():
        for _ in range(WARM):
            fn()
    events = {name: [] for name in variants}
    for _ in range(REPS):
        for name, fn in variants.items():
            events[name].append(timed(fn))
    torch.cuda.synchronize()
    ms = {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}
    print(f"rows={rows} keys={keys}: " + ", ".join(f"{name} {t:.3f} ms ({t / ms['sdpa']:.4f})" for name, t in ms.items()), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
