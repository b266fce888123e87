"""Like probe_gpus.py, for the ring's backward block: blocks.attend_backward (cuDNN) on 16 heads of a
64K x 64K block, bf16, B=1, D=128, back to back for SECONDS, timed by CUDA events; one process per GPU,
alone and while the neighbour runs the same. Prints the median call (second half)."""

import statistics
import sys
import time

import torch

from ringbench.attention import blocks

label, seconds = sys.argv[1], float(sys.argv[2])
dev = torch.device("cuda", 0)
for heads in (16, 2):
    q, k, v, dout = (torch.randn(1, heads, 65536, 128, dtype=torch.bfloat16, device=dev) for _ in range(4))
    out, lse = blocks.attend("cudnn", q, k, v, False)

    def call():
        blocks.attend_backward("cudnn", dout, q, k, v, out, lse, False)

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
    half = ms[len(ms) // 2 :]
    print(f"{label} backward {heads} heads 64K: median {statistics.median(half):.3f} ms over {len(half)} calls "
          f"(per head {statistics.median(half) / heads:.3f}; first half {statistics.median(ms[: len(ms) // 2]):.3f})",
          flush=True)
    del q, k, v, dout, out, lse
