"""One H200: what the pieces of a gathered ring-of-two forward cost, bf16 B=1 H=16 D=128, cuDNN, CUDA-event medians."""
import statistics
import torch
from ringbench.attention import blocks

dev = torch.device("cuda", 0)
H, D, S = 16, 128, 131072
half = S // 2
g = torch.Generator(device=dev).manual_seed(0)
mk = lambda *s: torch.randn(*s, dtype=torch.bfloat16, device=dev, generator=g)
q = mk(1, H, half, D)
kf, vf = mk(1, H, S, D), mk(1, H, S, D)
qf = mk(1, H, S, D)
seqk, seqv = kf.permute(2, 0, 1, 3).contiguous(), vf.permute(2, 0, 1, 3).contiguous()
ks, vs = seqk.permute(1, 2, 0, 3), seqv.permute(1, 2, 0, 3)  # (1,H,S,D), sequence-major strides
k1, v1 = kf[:, :, :half].contiguous(), vf[:, :, :half].contiguous()
k2, v2 = kf[:, :, half:].contiguous(), vf[:, :, half:].contiguous()

def cud(q, k, v, lse):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, False, False)[0]

def two_blocks():
    a, al = blocks.attend("cudnn", q, k1, v1, False)
    b, bl = blocks.attend("cudnn", q, k2, v2, False)
    blocks.merge_(a, al, b, bl)

cases = {
    "full 128K no lse /2": lambda: cud(qf, kf, vf, False),
    "full 128K lse /2": lambda: cud(qf, kf, vf, True),
    "64K x 128K contiguous no lse": lambda: cud(q, kf, vf, False),
    "64K x 128K contiguous lse": lambda: cud(q, kf, vf, True),
    "64K x 128K seq-major no lse": lambda: cud(q, ks, vs, False),
    "60K x 128K seq-major no lse": lambda: cud(q[:, :, 4096:], ks, vs, False),
    "64K x 64K lse": lambda: cud(q, k1, v1, True),
    "64K x 64K no lse": lambda: cud(q, k1, v1, False),
    "two 64K blocks lse + merge": two_blocks,
    "cat 4K+60K": lambda: torch.cat([q[:, :, :4096], q[:, :, 4096:]], dim=2),
}
times = {n: [] for n in cases}
for rep in range(15):
    for n, f in cases.items():
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); e.synchronize()
        if rep >= 3:
            times[n].append(s.elapsed_time(e) / (2 if n.endswith("/2") else 1))
for n, ms in times.items():
    print(f"{n}: median {statistics.median(ms):.3f} ms (min {min(ms):.3f}, max {max(ms):.3f})", flush=True)
