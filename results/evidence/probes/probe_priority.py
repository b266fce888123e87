"""Two GPUs, 128K tokens, bf16, B=1 H=16 D=128, cuDNN: zigzag `ring` forward and forward+backward,
non-causal, each timed back to back for SECONDS (CUDA events around the loop, mean per call), under
whatever NCCL stream priority the environment sets (TORCH_NCCL_HIGH_PRIORITY): run once without and
once with it (priority.sh). probe_sustained.py's trace showed a ring step's NCCL kernel and its block
kernel becoming ready together; when the block kernel's 132 CTAs took every SM first, the transfer
ran only at the block's tail and its whole 1.5-1.8 ms stood exposed before the next block."""
import os
import time

import torch
import torch.distributed as dist

from ringbench.attention.registry import Registry
from ringbench.run import pipeline
from ringbench.vocabulary import Cell

rank, P = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
S, H, D, SECONDS = 131072, 16, 128, 3.0
PRIORITY = os.environ.get("TORCH_NCCL_HIGH_PRIORITY", "0")


def sustained(fn):
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
                torch.cuda.synchronize()
        b.record()
        torch.cuda.synchronize()
    return a.elapsed_time(b) / calls, calls


impl = Registry.bundled().get("ring")
options = impl.resolve_options({"kernel": "cudnn", "zigzag": True}, "ring")
for pass_name in ("forward", "forward+backward"):
    cell = Cell("ring", tuple(sorted(options.items())), S, P, 1, H, D, "bfloat16", False, pass_name, P)
    problem = pipeline.make_problem(cell, dev, 0, rank)
    bench = pipeline._as_bench(impl.setup(problem))
    inputs = bench.inputs or (problem.q, problem.k, problem.v)
    grad_out = None if pass_name == "forward" else torch.randn_like(bench.run())
    fn = pipeline._pass_closure(pass_name, bench.run, inputs, grad_out)
    ms, calls = sustained(fn)
    print(f"[r{rank}] TORCH_NCCL_HIGH_PRIORITY={PRIORITY} ring {pass_name}: {ms:.3f} ms per call over {calls} calls", flush=True)
    del fn, bench, problem, inputs, grad_out
    torch.cuda.empty_cache()
dist.destroy_process_group()
