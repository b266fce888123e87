"""A ring of two's non-causal forward at 128K tokens (64K rows a rank), bf16, B, H=16, D=128, cuDNN,
two ways, interleaved call by call, CUDA-event medians:

- ring: send own K/V (stacked, one message), own block with lse while it travels, peer block with lse,
  merge in place (as ring runs it).
- gather(r): K, V laid out sequence-major (2 halves, S/2, B, H, D) so that own and peer halves are
  one key axis; own halves sent, peer halves received in place; the first r rows attend own keys
  while the transfer runs, then rows r.. attend all keys in one call without lse, then the first r
  rows attend the peer's keys and merge; output by cat.
Also single-GPU SDPA (public cuDNN call) at 128K on each rank, and the strided-layout check against ring's output.
Run: torchrun --nproc-per-node 2 probe_gather.py"""

import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringbench.attention import blocks

dist.init_process_group("nccl")
rank = dist.get_rank()
peer = 1 - rank
dev = torch.device("cuda", rank)
torch.cuda.set_device(dev)
B = int(os.environ.get("BATCH", "1"))
H, D, S = 16, 128, 131072 // B
half = S // 2
g = torch.Generator(device=dev).manual_seed(rank)
q = torch.randn(B, H, half, D, dtype=torch.bfloat16, device=dev, generator=g)
k = torch.randn(B, H, half, D, dtype=torch.bfloat16, device=dev, generator=g)
v = torch.randn(B, H, half, D, dtype=torch.bfloat16, device=dev, generator=g)
kv = torch.stack([k, v])
received = torch.empty_like(kv)

# Sequence-major K and V: (halves, S/2, B, H, D); half j holds rank j's keys.
seq = torch.empty(2, 2, half, B, H, D, dtype=torch.bfloat16, device=dev)
seq[0, rank].copy_(k.permute(2, 0, 1, 3))
seq[1, rank].copy_(v.permute(2, 0, 1, 3))
k_all = seq[0].view(S, B, H, D).permute(1, 2, 0, 3)
v_all = seq[1].view(S, B, H, D).permute(1, 2, 0, 3)
k_own, v_own = k_all[:, :, rank * half : (rank + 1) * half], v_all[:, :, rank * half : (rank + 1) * half]
k_peer, v_peer = k_all[:, :, peer * half : (peer + 1) * half], v_all[:, :, peer * half : (peer + 1) * half]


def no_lse(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0]


def ring():
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, peer), dist.P2POp(dist.irecv, received, peer)])
    acc, acc_lse = blocks.attend("cudnn", q, k, v, False)
    for r in reqs:
        r.wait()
    out, lse = blocks.attend("cudnn", q, received[0], received[1], False)
    blocks.merge_(acc, acc_lse, out, lse)
    return acc


def gather(r):
    def call():
        reqs = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, seq[0, rank], peer),
                dist.P2POp(dist.isend, seq[1, rank], peer),
                dist.P2POp(dist.irecv, seq[0, peer], peer),
                dist.P2POp(dist.irecv, seq[1, peer], peer),
            ]
        )
        early, early_lse = blocks.attend("cudnn", q[:, :, :r], k_own, v_own, False)
        for req in reqs:
            req.wait()
        late = no_lse(q[:, :, r:], k_all, v_all)
        out, lse = blocks.attend("cudnn", q[:, :, :r], k_peer, v_peer, False)
        blocks.merge_(early, early_lse, out, lse)
        return torch.cat([early, late], dim=2)

    return call


def sdpa_full():
    return full_out()


qf = torch.randn(B, H, S, D, dtype=torch.bfloat16, device=dev, generator=g)
kf, vf = torch.randn_like(qf), torch.randn_like(qf)


def full_out():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(qf, kf, vf)


cases = {"ring": ring, "sdpa128K/2": full_out}
for r in (2048, 4096, 8192):
    cases[f"gather r={r}"] = gather(r)

a = ring()
for r in (2048, 4096, 8192):
    b = cases[f"gather r={r}"]()
    err = (a.float() - b.float()).abs().max().item()
    print(f"rank {rank} B={B}: gather r={r} against ring max abs diff {err:.3e}", flush=True)
del a, b

times = {name: [] for name in cases}
for rep in range(18):
    for name, fn in cases.items():
        dist.barrier()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        if rep >= 3:
            times[name].append(s.elapsed_time(e) / (2 if name.startswith("sdpa") else 1))
for name, ms in times.items():
    print(f"rank {rank} B={B} {name}: median {statistics.median(ms):.3f} ms (min {min(ms):.3f}, max {max(ms):.3f})", flush=True)
dist.destroy_process_group()
