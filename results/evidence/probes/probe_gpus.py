"""bf16, B=1 H=16 D=128, cuDNN forward at 64K tokens (a ring-of-two block's shape, and 8 heads at
128K, Ulysses' attention on two GPUs): one GPU's sustained rate, for SECONDS of back-to-back calls
timed by CUDA events, alone and while its neighbours run the same. Run by probe_gpus.sh, one process
per GPU; prints the median call."""

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

label, seconds = sys.argv[1], float(sys.argv[2])
dev = torch.device("cuda", 0)
shapes = {"16 heads 64K": (16, 65536), "8 heads 128K": (8, 131072)}
for name, (heads, rows) in shapes.items():
    q, k, v = (torch.randn(1, heads, rows, 128, dtype=torch.bfloat16, device=dev) for _ in range(3))

    def call():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    pairs, begin = [], time.perf_counter()
    while time.perf_counter() - begin < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        pairs.append((start, end))
    ms = [s.elapsed_time(e) for s, e in pairs]
    half = ms[len(ms) // 2 :]  # the second half: clocks settled
    print(f"{label} {name}: median {statistics.median(half):.3f} ms over {len(half)} calls "
          f"(first half {statistics.median(ms[: len(ms) // 2]):.3f})", flush=True)
    del q, k, v
