"""Two GPUs, 128K tokens, bf16, B=1 H=16 D=128, cuDNN, non-causal forward, everything timed back to
back for SECONDS each (CUDA events around the whole loop, mean per call), both GPUs busy at once as
in a ring: SDPA's public call at 128K (the single-GPU cell's work), at 64K (a ring-of-two block
without the log-sum-exp), the 64K block with it (blocks.attend, as ring runs it), then zigzag
`ring` itself; then PROFILED ring calls back to back on every rank, their traces exported for
probe_sustained_trace.py. What a ring of two's forward costs beyond its two blocks, under the load
its timed samples run under."""
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from ringbench.attention import blocks
from ringbench.attention.registry import Registry
from ringbench.run import pipeline
from ringbench.vocabulary import Cell

rank, P = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
S, H, D, SECONDS, PROFILED = 131072, 16, 128, 4.0, 4
OUT = os.environ.get("OUT", "/tmp")


def sustained(fn):
    """Mean ms per call over SECONDS of back-to-back calls, after a second of them."""
    for seconds in (1.0, SECONDS):
        torch.cuda.synchronize()
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin, calls = time.perf_counter(), 0
        a.record()
        while time.perf_counter() - begin < seconds or calls < 3:
            fn()
            calls += 1
            if calls % 4 == 0:
                torch.cuda.synchronize()  # keep the host within a few calls of the GPU
        b.record()
        torch.cuda.synchronize()
    return a.elapsed_time(b) / calls, calls


def say(name, result):
    print(f"[r{rank}] {name}: {result[0]:.3f} ms per call over {result[1]} calls", flush=True)


with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
    say("sdpa 128K", sustained(lambda: F.scaled_dot_product_attention(q, q, q)))
    h = q[:, :, : S // 2].contiguous()
    say("sdpa 64K (a block, no log-sum-exp)", sustained(lambda: F.scaled_dot_product_attention(h, h, h)))
    say("block 64K with log-sum-exp", sustained(lambda: blocks.attend("cudnn", h, h, h, False)))
    del q, h
impl = Registry.bundled().get("ring")
options = impl.resolve_options({"kernel": "cudnn", "zigzag": True}, "ring")
cell = Cell("ring", tuple(sorted(options.items())), S, P, 1, H, D, "bfloat16", False, "forward", P)
problem = pipeline.make_problem(cell, dev, 0, rank)
bench = pipeline._as_bench(impl.setup(problem))
say("ring forward", sustained(bench.run))
torch.cuda.synchronize()
dist.barrier()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(PROFILED):
        bench.run()
    torch.cuda.synchronize()
prof.export_chrome_trace(f"{OUT}/sustained-r{rank}.json")
dist.destroy_process_group()
