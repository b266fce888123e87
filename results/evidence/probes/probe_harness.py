"""Ulysses forward at 128K, P=2: the same closure timed by a plain loop and by ringbench's measure (with and without the L2 flush)."""
import os, statistics
import torch, torch.distributed as dist
from ringbench.attention.registry import Registry, Problem
from ringbench.attention.inputs import Generated
from ringbench.attention.comm import WaitClock
from ringbench.run.timing import measure
from ringbench.run.modes import l2_flush
from ringbench.sweep.config import TimingBudget

rank = int(os.environ["RANK"]); P = int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])); torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
reg = Registry.bundled()
say = lambda *a: print(f"[P={P} r{rank}]", *a, flush=True)
S, H, D = 131072, 16, 128
BUDGET = TimingBudget(warmup_ms=200, rep_ms=1000, min_reps=10, max_reps=1000, max_ms=6000)


def agree(x):
    t = torch.tensor([float(x)], device=dev, dtype=torch.float64); dist.all_reduce(t, op=dist.ReduceOp.MAX); return t.item()


def loop(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); dist.barrier()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def slowest_median(timing):
    return statistics.median(agree(s) for s in timing.samples_ms)


flush = l2_flush(dev)
for causal in (False, True):
    impl = reg.get("ulysses")
    opts = impl.resolve_options({"backend": "cudnn", "chunks": 1}, "ulysses")
    problem = Problem(inputs=Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False), causal=causal,
                      ring_size=None, options=opts, rank=rank, world_size=P, comm=WaitClock(dev))
    fn = impl.setup(problem).run
    results = {}
    for name in ("loop", "measure", "measure+flush", "loop again"):
        if name.startswith("loop"):
            results[name] = loop(fn)
        else:
            results[name] = slowest_median(measure(fn, dev, BUDGET, agree, flush if "flush" in name else None))
    say(f"ulysses causal={causal}: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
    del fn, problem
    torch.cuda.empty_cache()
dist.barrier()
dist.destroy_process_group()
