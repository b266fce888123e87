"""Zigzag ring across processes, 128K tokens, cuDNN blocks, non-causal: forward and forward+backward timed
in a plain loop, then three calls of each profiled on every rank, traces exported for
probe_ring_trace.py; beside SDPA on one GPU."""
import os, statistics
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.profiler import profile, ProfilerActivity
from ringbench.attention.registry import Registry
from ringbench.run import pipeline
from ringbench.vocabulary import Cell

rank = int(os.environ["RANK"]); P = int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])); torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
say = lambda *a: print(f"[P={P} r{rank}]", *a, flush=True)
S, H, D = 131072, 16, 128
OUT = os.environ.get("OUT", "/tmp")
impl = Registry.bundled().get("ring")
options = impl.resolve_options({"kernel": "cudnn", "zigzag": True}, "ring")


def loop(fn, n=8):
    for _ in range(2): fn()
    torch.cuda.synchronize(); dist.barrier()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
    say(f"sdpa cudnn one GPU forward: {loop(lambda: F.scaled_dot_product_attention(q, q, q)):.2f} ms")
    del q
for pass_name in ("forward", "forward+backward"):
    cell = Cell("ring", tuple(sorted(options.items())), S, P, 1, H, D, "bfloat16", False, pass_name, P)
    problem = pipeline.make_problem(cell, dev, 0, rank)
    bench = pipeline._as_bench(impl.setup(problem))
    inputs = bench.inputs or (problem.q, problem.k, problem.v)
    grad_out = None if pass_name == "forward" else torch.randn_like(bench.run())
    fn = pipeline._pass_closure(pass_name, bench.run, inputs, grad_out)
    say(f"ring {pass_name}: {loop(fn):.2f} ms per call")
    torch.cuda.synchronize(); dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):  # the first absorbs the ranks' skew from starting the profiler; read the last two
            fn()
            torch.cuda.synchronize(); dist.barrier()
    path = f"{OUT}/ring-{pass_name.replace('+', '-')}-P{P}-r{rank}.json"
    prof.export_chrome_trace(path)
    del fn, bench, problem, inputs, grad_out
    torch.cuda.empty_cache()
dist.destroy_process_group()
