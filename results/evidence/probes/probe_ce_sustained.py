"""Two GPUs, 128K tokens, bf16, B=1 H=16 D=128, cuDNN, non-causal forward, each closure called back to
back as ringbench's one-second samples call it (no synchronisation between calls; CUDA events around
SECONDS of calls, mean per call), both GPUs at once: SDPA at 128K (the single-GPU cell's work), the
64K block with its log-sum-exp (blocks.attend, as ring runs it), then zigzag `ring` with NCCL and
with copy-engine transfers; then PROFILED calls of each ring back to back on every rank, their traces
exported. Where a ring of two's forward loses against two of its blocks, with the copy-engine flags
set by stream memory operations."""
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
S, H, D, SECONDS, PROFILED = 131072, 16, 128, 4.0, 6
OUT = os.environ.get("OUT", "/tmp")


def sustained(fn):
    """Mean ms per call over about SECONDS of calls queued back to back, after a second of them."""
    torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one_s = max(time.perf_counter() - begin, 1e-4)
    for seconds in (1.0, SECONDS):
        calls = int(dist_max(max(3, seconds / one_s)))
        torch.cuda.synchronize()
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
    return a.elapsed_time(b) / calls, calls


def dist_max(value):
    t = torch.tensor([float(value)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def say(name, result):
    print(f"[r{rank}] {name}: {result[0]:.3f} ms per call over {result[1]} calls", flush=True)


with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
    say("sdpa 128K", sustained(lambda: F.scaled_dot_product_attention(q, q, q)))
    h = q[:, :, : S // 2].contiguous()
    say("block 64K with log-sum-exp", sustained(lambda: blocks.attend("cudnn", h, h, h, False)))
    del q, h
impl = Registry.bundled().get("ring")
for transfers in ("nccl", "copy-engine"):
    options = impl.resolve_options({"kernel": "cudnn", "zigzag": True, "transfers": transfers}, "ring")
    cell = Cell("ring", tuple(sorted(options.items())), S, P, 1, H, D, "bfloat16", False, "forward", P)
    problem = pipeline.make_problem(cell, dev, 0, rank)
    bench = pipeline._as_bench(impl.setup(problem))
    say(f"ring forward, {problem.facts.get('transfers', transfers)}", sustained(bench.run))
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED):
            bench.run()
        torch.cuda.synchronize()
    prof.export_chrome_trace(f"{OUT}/{transfers}-r{rank}.json")
    del bench, problem
    torch.cuda.empty_cache()
dist.destroy_process_group()
