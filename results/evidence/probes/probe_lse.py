"""One H200, bf16, B=1 H=16 D=128, cuDNN: does returning the log-sum-exp cost the block kernel time?

SDPA's public call (no log-sum-exp, as single-GPU `sdpa` cells run it) against the cuDNN op that
returns it (as `ring`'s blocks run it, `blocks.attend`), interleaved call by call so that clock
swings fall on both alike; forward, and forward+backward through autograd for the public call
against the block kernel's backward fed the block's own output and log-sum-exp. Medians of CUDA-event
times over REPS calls of each, after WARM calls of each.
"""

import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringbench.attention import blocks

REPS, WARM = int(sys.argv[1]) if len(sys.argv) > 1 else 30, 5
dev = torch.device("cuda", 0)


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    return start, end


def compare(label, a, b):
    for _ in range(WARM):
        a(), b()
    pairs = [(timed(a), timed(b)) for _ in range(REPS)]
    torch.cuda.synchronize()
    ta = statistics.median(s.elapsed_time(e) for (s, e), _ in pairs)
    tb = statistics.median(s.elapsed_time(e) for _, (s, e) in pairs)
    print(f"{label}: sdpa {ta:.3f} ms, with lse {tb:.3f} ms, ratio {tb / ta:.4f}", flush=True)


for rows in (65536, 131072):
    for causal in (False, True):
        q, k, v = (torch.randn(1, 16, rows, 128, dtype=torch.bfloat16, device=dev) for _ in range(3))

        def plain():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        compare(f"forward S={rows} causal={causal}", plain, lambda: blocks.attend("cudnn", q, k, v, causal))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)

        def plain_both():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).backward(dout)

        def block_both():
            out, lse = blocks.attend("cudnn", q, k, v, causal)
            blocks.attend_backward("cudnn", dout, q, k, v, out, lse, causal)

        compare(f"forward+backward S={rows} causal={causal}", plain_both, block_both)
        del q, k, v, qg, kg, vg, dout
        torch.cuda.empty_cache()
