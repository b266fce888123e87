"""Where ulysses' forward spends its time at 128K, P=2: a profiled call's kernels on rank 0, beside SDPA on H and H/P heads."""
import os, statistics
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.profiler import profile, ProfilerActivity
from ringbench.attention.registry import Registry, Problem
from ringbench.attention.inputs import Generated
from ringbench.attention.comm import WaitClock

rank = int(os.environ["RANK"]); P = int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])); torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
reg = Registry.bundled()
say = lambda *a: print(f"[P={P} r{rank}]", *a, flush=True)
S, H, D = 131072, 16, 128
OUT = os.environ.get("OUT", "/tmp")


def loop(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); dist.barrier()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def sdpa(heads, causal):
    q, k, v = (torch.randn(1, heads, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    def fn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def breakdown(prof, calls, tag):
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kinds = {}
    for e in kernels:
        n = e.name
        kind = ("nccl" if "nccl" in n.lower() else "attention" if any(s in n.lower() for s in ("cudnn", "flash", "fmha", "sm90", "attn")) else
                "memcpy" if "memcpy" in n.lower() or "copy" in n.lower() else "other")
        t = kinds.setdefault(kind, [0.0, 0, set()]); t[0] += e.device_time; t[1] += 1; t[2].add(n[:70])
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / calls
    say(f"{tag}: span per call {span / 1000:.2f} ms")
    for kind, (us, c, names) in sorted(kinds.items(), key=lambda x: -x[1][0]):
        say(f"   {kind:9} {us / calls / 1000:8.3f} ms  x{c // calls}  {sorted(names)[:3]}")
    # the compute stream's idle time: gaps between consecutive attention/other kernels on the busiest stream
    by_stream = {}
    for e in kernels:
        by_stream.setdefault(getattr(e, "device_resource_id", 0), []).append((e.time_range.start, e.time_range.end, e.name[:40]))
    for sid, evs in by_stream.items():
        evs.sort()
        busy = sum(b - a for a, b, _ in evs)
        say(f"   stream {sid}: {len(evs) // calls} kernels/call, busy {busy / calls / 1000:.3f} ms/call; first {[(round((a - evs[0][0]) / 1000, 3), round((b - a) / 1000, 3), n) for a, b, n in evs[:8]]}")


from ringbench.attention import blocks
from ringbench.attention.comm import post_swap
from ringbench.attention.impls.ulysses import HeadShards, by_rank


def local_first(q, k, v, causal, clock):
    """P=2: attend this rank's own rows of its heads while the all-to-all brings the rest."""
    r, o, h, half = rank, 1 - rank, H // 2, S // 2
    mine, theirs = slice(r * h, (r + 1) * h), slice(o * h, (o + 1) * h)
    rows_r, rows_o = slice(r * half, (r + 1) * half), slice(o * half, (o + 1) * half)
    inbound = post_swap([by_rank(t, 2) for t in (q, k, v)], HeadShards.within(None, True), clock)
    ql, kl, vl = q[:, mine], k[:, mine], v[:, mine]
    out = torch.empty_like(q)
    if causal and r == 0:
        out[:, mine] = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
        Q, K, V = inbound.arrived()[0].unbind()
        a, la = blocks.attend("cudnn", Q[:, :, rows_o], K[:, :, rows_r], V[:, :, rows_r], False)
        b, lb = blocks.attend("cudnn", Q[:, :, rows_o], K[:, :, rows_o], V[:, :, rows_o], True)
        acc = a.float(); blocks.merge_(acc, la, b, lb); remote = acc.to(q.dtype)
    elif causal:
        b, lb = blocks.attend("cudnn", ql, kl, vl, True)
        Q, K, V = inbound.arrived()[0].unbind()
        remote = F.scaled_dot_product_attention(Q[:, :, rows_o], K[:, :, rows_o], V[:, :, rows_o], is_causal=True)
        a, la = blocks.attend("cudnn", ql, K[:, :, rows_o], V[:, :, rows_o], False)
        acc = a.float(); blocks.merge_(acc, la, b, lb); out[:, mine] = acc.to(q.dtype)
    else:
        b, lb = blocks.attend("cudnn", ql, kl, vl, False)
        Q, K, V = inbound.arrived()[0].unbind()
        remote = F.scaled_dot_product_attention(Q[:, :, rows_o], K, V)
        back = clock.swap([(remote, out[:, theirs], o)])
        a, la = blocks.attend("cudnn", ql, K[:, :, rows_o], V[:, :, rows_o], False)
        acc = a.float(); blocks.merge_(acc, la, b, lb); out[:, mine] = acc.to(q.dtype)
        clock.wait(back)
        return out
    clock.wait(clock.swap([(remote, out[:, theirs], o)]))
    return out


for causal in (False, True):
    for heads in (H, H // P):
        say(f"sdpa cudnn causal={causal} H={heads}: {loop(sdpa(heads, causal)):.2f} ms (both GPUs at once)")
        torch.cuda.empty_cache()
    impl = reg.get("ulysses")
    opts = impl.resolve_options({"backend": "cudnn", "chunks": 1}, "ulysses")
    problem = Problem(inputs=Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False), causal=causal,
                      ring_size=None, options=opts, rank=rank, world_size=P, comm=WaitClock(dev))
    fn = impl.setup(problem).run
    say(f"ulysses causal={causal}: loop {loop(fn):.2f} ms")
    torch.cuda.synchronize(); dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3): fn()
        torch.cuda.synchronize()
    if rank == 0:
        breakdown(prof, 3, f"ulysses causal={causal}")
        prof.export_chrome_trace(f"{OUT}/ulysses-causal{int(causal)}-r{rank}.json")
    say(f"ulysses causal={causal}: loop again {loop(fn):.2f} ms")
    q, k, v = problem.shard(torch.arange(rank * S // P, (rank + 1) * S // P, device=dev))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        lf = lambda: local_first(q, k, v, causal, problem.comm)
        err = (lf().float() - fn().float()).abs().max().item()
        say(f"local-first causal={causal}: max diff from plain {err:.3e}")
        for i in range(2):
            say(f"local-first causal={causal}: loop {loop(lf):.2f} ms; plain {loop(fn):.2f} ms")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3): lf()
            torch.cuda.synchronize()
    if rank == 0:
        breakdown(prof, 3, f"local-first causal={causal}")
        prof.export_chrome_trace(f"{OUT}/local-first-causal{int(causal)}-r{rank}.json")
    del fn, problem
    torch.cuda.empty_cache()
dist.barrier()
dist.destroy_process_group()
