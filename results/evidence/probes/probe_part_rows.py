"""Two processes, one GPU each (NCCL): ring's forward+backward at 128K tokens (bf16, B=1, H=16, D=128,
cuDNN, zigzag) with its backward in parts of 2, 4, 8 and 16 heads (blocks.BACKWARD_PART_ROWS), in
rounds so that drift spreads over every size: median of 8 calls per size and round, timed by CUDA
events in a plain loop, and each call's peak allocated memory above what it started with."""
import os
import statistics

import torch
import torch.distributed as dist

from ringbench.attention import blocks
from ringbench.attention.comm import WaitClock
from ringbench.attention.impls import ring

dist.init_process_group("nccl")
rank, P = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
torch.cuda.set_device(dev)
B, H, S, D = 1, 16, 131072, 128
ROWS = {2: 2**17, 4: 2**18, 8: 2**19, 16: 2**21}  # heads per part at 64K rows a rank
g = torch.Generator(device=dev).manual_seed(rank)
for causal in (False, True):
    rows = S // P
    q = torch.randn(B, H, rows, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    kv = torch.randn(2, B, H, rows, D, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (t.requires_grad_() for t in kv.unbind())
    dout = torch.randn(B, H, rows, D, device=dev, dtype=torch.bfloat16, generator=g)
    one = ring.OneRank(q, kv, causal=causal, kernel="cudnn", zigzag=True, comm=WaitClock(dev), rank=rank,
                       ring_size=P, send_to=(rank + 1) % P, receive_from=(rank - 1) % P,
                       received=ring.receive_buffers(kv.shape, kv, P))

    def call():
        for t in (q, k, v):
            t.grad = None
        blocks.Differentiable.apply(q, k, v, one).backward(dout)

    times = {heads: [] for heads in ROWS}
    peaks = {}
    for round_ in range(3):
        for heads, part_rows in ROWS.items():
            blocks.BACKWARD_PART_ROWS = part_rows
            call()
            torch.cuda.synchronize(dev)
            dist.barrier()
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            call()
            torch.cuda.synchronize(dev)
            peaks[heads] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
            dist.barrier()
            pairs = []
            for _ in range(8):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                pairs.append((start, end))
            torch.cuda.synchronize(dev)
            times[heads].append(statistics.median(s.elapsed_time(e) for s, e in pairs))
            dist.barrier()
    if rank == 0 or os.environ.get("ALL"):
        for heads in ROWS:
            print(f"[r{rank}] causal={causal} part of {heads} heads: rounds "
                  f"{' '.join(f'{t:.2f}' for t in times[heads])} ms; median {statistics.median(times[heads]):.2f}; "
                  f"peak {peaks[heads]:.1f} MiB", flush=True)
    del q, k, v, kv, dout, one
dist.destroy_process_group()
