"""One H200, bf16, D=128, cuDNN: a block backward's time per head as the part of heads grows, at the
rows a rank of a ring holds (64K: two GPUs at 128K tokens; 32K: four; 16K: eight)."""
import statistics
import torch
from ringbench.attention import blocks

dev = torch.device("cuda", 0)
D = 128


def loop(fn, n=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


for rows in (65536, 32768, 16384):
    for causal in (False, True):
        line = []
        base = None
        for heads in (16, 8, 4, 2, 1):
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v, dout = (torch.randn(1, heads, rows, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
            out, lse = blocks.attend("cudnn", q, k, v, causal)
            fwd = loop(lambda: blocks.attend("cudnn", q, k, v, causal))
            bwd = loop(lambda: blocks.attend_backward("cudnn", dout, q, k, v, out, lse, causal))
            per_head = bwd / heads
            base = base or per_head
            line.append(f"H={heads}: fwd {fwd / heads:.3f} bwd {per_head:.3f} ms/head ({per_head / base:.3f})")
            del q, k, v, dout, out, lse
        print(f"rows={rows} causal={causal}: " + "; ".join(line), flush=True)
