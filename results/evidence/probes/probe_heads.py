"""One H200, bf16, B=1, D=128, cuDNN forward through SDPA's public call: is a call on fewer heads
slower per head? Ulysses on P GPUs attends H/P heads over the whole sequence; the scaling model
times that as the single-GPU call on all H heads, scaled by H/P. Calls on 16, 8 and 4 heads at one
sequence length interleaved call by call, medians of CUDA-event times over REPS calls of each after
WARM; printed per head and over the 16 heads' figure per head."""

import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPS, WARM = int(sys.argv[1]) if len(sys.argv) > 1 else 15, 3
dev = torch.device("cuda", 0)


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    return start, end


for rows, heads_list in ((131072, (16, 8, 4)), (65536, (16, 8, 4)), (32768, (16, 8))):
    for causal in (False, True):
        inputs = {h: [torch.randn(1, h, rows, 128, dtype=torch.bfloat16, device=dev) for _ in range(3)] for h in heads_list}

        def call(h):
            q, k, v = inputs[h]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        for h in heads_list:
            for _ in range(WARM):
                call(h)
        events = {h: [] for h in heads_list}
        for _ in range(REPS):
            for h in heads_list:
                events[h].append(timed(lambda: call(h)))
        torch.cuda.synchronize()
        per_head = {h: statistics.median(s.elapsed_time(e) for s, e in events[h]) / h for h in heads_list}
        print(f"S={rows} causal={causal}: " + ", ".join(
            f"H={h} {per_head[h] * h:.3f} ms ({per_head[h] / per_head[16]:.4f} per head)" for h in heads_list), flush=True)
        del inputs
        torch.cuda.empty_cache()
