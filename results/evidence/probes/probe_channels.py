"""Ulysses at 128K on 2 GPUs under NCCL channel settings (env): all-to-all times, plain and default forward."""
import os, statistics
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from ringbench.attention.registry import Registry, Problem
from ringbench.attention.inputs import Generated
from ringbench.attention.comm import WaitClock
from ringbench.attention.impls.ulysses import to_heads, to_sequence

rank = int(os.environ["RANK"]); P = int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])); torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
reg = Registry.bundled()
tag = os.environ.get("TAG", "default")
say = lambda *a: print(f"[{tag} r{rank}]", *a, flush=True) if rank == 0 else None
S, H, D = 131072, 16, 128


def loop(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); dist.barrier()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def ulysses(causal, own):
    impl = reg.get("ulysses")
    opts = impl.resolve_options({"backend": "cudnn", "own_rows_first": own}, "ulysses")
    problem = Problem(inputs=Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False), causal=causal,
                      ring_size=None, options=opts, rank=rank, world_size=P, comm=WaitClock(dev))
    return impl.setup(problem).run


clock = WaitClock(dev)
shard = torch.randn(1, H, S // P, D, device=dev, dtype=torch.bfloat16)
a2a_in = loop(lambda: to_heads([shard, shard, shard], clock).arrived())
heads = torch.randn(1, H // P, S, D, device=dev, dtype=torch.bfloat16)
a2a_out = loop(lambda: to_sequence(heads, clock))
del shard, heads
say(f"all-to-all q,k,v {a2a_in:.3f} ms ({3 * (P - 1) * S // P * H * D * 2 / P / a2a_in / 1e6:.0f} GB/s sent); out {a2a_out:.3f} ms")
for causal in (False, True):
    q = torch.randn(1, H // P, S, D, device=dev, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        att = loop(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=causal))
    del q
    line = [f"causal={causal}: attention alone {att:.2f}"]
    for own in ("never", "always"):
        fn = ulysses(causal, own)
        line.append(f"{own} {loop(fn):.2f} {loop(fn):.2f}")
        del fn
        torch.cuda.empty_cache()
    say(" | ".join(line))
dist.barrier()
dist.destroy_process_group()
