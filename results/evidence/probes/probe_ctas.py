"""Ulysses forward at 128K: sdpa per-head cost, plain vs chunked, under NCCL CTA caps (env NCCL_MAX_CTAS)."""
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
tag = f"P={P} MAX_CTAS={os.environ.get('NCCL_MAX_CTAS', '-')} CHUNK={os.environ.get('NCCL_P2P_NVL_CHUNKSIZE', '-')}"
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


def ulysses(causal, chunks):
    impl = reg.get("ulysses")
    opts = impl.resolve_options({"backend": "cudnn", "chunks": chunks}, "ulysses")
    problem = Problem(inputs=Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False), causal=causal,
                      ring_size=None, options=opts, rank=rank, world_size=P, comm=WaitClock(dev))
    return impl.setup(problem).run


if os.environ.get("SDPA_HEADS"):
    for causal in (False, True):
        q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        base = None
        for h in (16, 8, 4, 2, 1):
            qh, kh, vh = (t[:, :h].contiguous() for t in (q, k, v))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                t = loop(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal))
            base = base or t
            say(f"sdpa cudnn causal={causal} H={h}: {t:.2f} ms, share of H16 time x 16/H: {t * 16 / h / base:.4f}")
        del q, k, v, qh, kh, vh

clock = WaitClock(dev)
shard = torch.randn(1, H, S // P, D, device=dev, dtype=torch.bfloat16)
a2a_in = loop(lambda: to_heads([shard, shard, shard], clock).arrived())
heads = torch.randn(1, H // P, S, D, device=dev, dtype=torch.bfloat16)
a2a_out = loop(lambda: to_sequence(heads, clock))
say(f"all-to-all q,k,v in {a2a_in:.3f} ms; out {a2a_out:.3f} ms")
for causal in (False, True):
    qh = torch.randn(1, H // P, S, D, device=dev, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        att = loop(lambda: F.scaled_dot_product_attention(qh, qh, qh, is_causal=causal))
    del qh
    for chunks in [c for c in (1, 2, 4, 8) if H % (P * c) == 0]:
        fn = ulysses(causal, chunks)
        t = loop(fn)
        say(f"causal={causal} chunks={chunks}: {t:.2f} ms (attention alone {att:.2f}, + a2a {att + a2a_in + a2a_out:.2f})")
        del fn
        torch.cuda.empty_cache()
dist.barrier()
dist.destroy_process_group()
