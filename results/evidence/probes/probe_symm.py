"""1 GPU: (A) symmetric memory between two processes of one GPU (gloo group): push + barrier correct?
(B) cost of cutting 8-head 128K attention into own-rows-first calls vs one call; (C) drift of sdpa time with clocks."""
import os, statistics, sys, time
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
dev = torch.device("cuda", 0); torch.cuda.set_device(dev)
mode = sys.argv[1]

if mode == "symm":
    import torch.distributed._symmetric_memory as symm_mem
    dist.init_process_group("gloo")
    rank, P = dist.get_rank(), dist.get_world_size()
    before = torch.cuda.memory_allocated(dev)
    buf = symm_mem.empty((P, 1 << 20), dtype=torch.bfloat16, device=dev)
    counted = torch.cuda.memory_allocated(dev) - before
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    remote = [hdl.get_buffer(j, buf.shape, buf.dtype) for j in range(P)]
    side = torch.cuda.Stream(dev)
    for it in range(3):
        mine = torch.full((1 << 20,), float(rank * 10 + it), dtype=torch.bfloat16, device=dev)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            hdl.barrier(channel=0)
            for j in range(P):
                remote[j][rank].copy_(mine)
            hdl.barrier(channel=1)
        torch.cuda.current_stream().wait_stream(side)
        ok = all(torch.all(buf[j] == float(j * 10 + it)).item() for j in range(P))
        print(f"[symm r{rank}] iteration {it}: ok={ok} counted={counted}", flush=True)
    dist.destroy_process_group()
    sys.exit()

def loop(fn, n=8):
    for _ in range(2): fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)

from ringbench.attention import blocks
S, D = 131072, 128
if mode == "split":
    for causal in (False, True):
        q, k, v = (torch.randn(1, 8, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        h = S // 2
        def one():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        def split():
            diag = blocks.attend("cudnn", q[:, :, :h], k[:, :, :h], v[:, :, :h], causal)
            if causal:
                below = blocks.attend("cudnn", q[:, :, h:], k[:, :, :h], v[:, :, :h], False)
                d2 = blocks.attend("cudnn", q[:, :, h:], k[:, :, h:], v[:, :, h:], True)
                acc, lse = d2[0].float(), d2[1]
                blocks.merge_(acc, lse, *below)
                return diag[0], acc.to(q.dtype)
            other = blocks.attend("cudnn", q[:, :, h:], k, v, False)
            after = blocks.attend("cudnn", q[:, :, :h], k[:, :, h:], v[:, :, h:], False)
            acc, lse = diag[0].float(), diag[1]
            blocks.merge_(acc, lse, *after)
            return acc.to(q.dtype), other[0]
        def calls_only():
            if causal:
                blocks.attend("cudnn", q[:, :, :h], k[:, :, :h], v[:, :, :h], True)
                blocks.attend("cudnn", q[:, :, h:], k[:, :, :h], v[:, :, :h], False)
                blocks.attend("cudnn", q[:, :, h:], k[:, :, h:], v[:, :, h:], True)
            else:
                blocks.attend("cudnn", q[:, :, :h], k[:, :, :h], v[:, :, :h], False)
                blocks.attend("cudnn", q[:, :, h:], k, v, False)
                blocks.attend("cudnn", q[:, :, :h], k[:, :, h:], v[:, :, h:], False)
        ref = one()
        a, b = split()
        err = max((a - ref[:, :, :h]).abs().max().item(), (b - ref[:, :, h:]).abs().max().item())
        res = []
        for _ in range(2):
            res.append((loop(one), loop(split), loop(calls_only)))
        print(f"[split causal={causal}] err={err:.2e} " + " | ".join(f"one {x:.2f} split {y:.2f} ({y/x:.4f}) calls {z:.2f} ({z/x:.4f})" for x, y, z in res), flush=True)
        del q, k, v

if mode == "drift":
    q, k, v = (torch.randn(1, 16, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    def one():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    start = time.time()
    while time.time() - start < 75:
        t = loop(one, 8)
        print(f"[drift] t={time.time()-start:5.1f}s median {t:.2f} ms clock {torch.cuda.clock_rate(dev)} MHz temp {torch.cuda.temperature(dev)} C power {torch.cuda.power_draw(dev)/1000:.0f} W", flush=True)
