# One H200: a ring-of-two rank's non-causal forward at 128K (64K query rows), its compute only, in
# several forms, each run back to back for 3 s in two rounds (order reversed in the second), mean per
# call from CUDA events; SDPA's 128K call halved beside them. bf16, B=1, H=16, D=128, cuDNN.
import time, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from ringbench.attention import blocks
torch.manual_seed(0)
B, H, S, D = 1, 16, 65536, 128
dt = torch.bfloat16
dev = "cuda"
r = 2048
q = torch.randn(B, H, S, D, device=dev, dtype=dt)
qf = torch.randn(B, H, 2 * S, D, device=dev, dtype=dt)
kf = torch.randn(B, H, 2 * S, D, device=dev, dtype=dt)
vf = torch.randn(B, H, 2 * S, D, device=dev, dtype=dt)
# BHSD gathered: own rows then the peer's, per head
k_bh, v_bh = kf, vf
# sequence-major gathered: (B, 2S, H, D) storage viewed as (B, H, 2S, D)
k_sm = kf.transpose(1, 2).contiguous().transpose(1, 2)
v_sm = vf.transpose(1, 2).contiguous().transpose(1, 2)
# separate contiguous shards as ring holds them today
k_own, v_own = kf[:, :, :S].contiguous(), vf[:, :, :S].contiguous()
k_peer, v_peer = kf[:, :, S:].contiguous(), vf[:, :, S:].contiguous()

def sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)

def ring_now():
    o, l = blocks.attend("cudnn", q, k_own, v_own, False)
    o2, l2 = blocks.attend("cudnn", q, k_peer, v_peer, False)
    blocks.merge_(o, l, o2, l2)
    return o

def ring_seqmajor():
    o, l = blocks.attend("cudnn", q, k_sm[:, :, :S], v_sm[:, :, :S], False)
    o2, l2 = blocks.attend("cudnn", q, k_sm[:, :, S:], v_sm[:, :, S:], False)
    blocks.merge_(o, l, o2, l2)
    return o

def gathered(k, v, lse):
    def f():
        if lse:
            return blocks.attend("cudnn", q, k, v, False)[0]
        return sdpa(q, k, v)
    return f

def gathered_split(k, v, lse):
    def f():
        o_r, l_r = blocks.attend("cudnn", q[:, :, :r], k[:, :, :S], v[:, :, :S], False)
        rest = blocks.attend("cudnn", q[:, :, r:], k, v, False)[0] if lse else sdpa(q[:, :, r:], k, v)
        o_p, l_p = blocks.attend("cudnn", q[:, :, :r], k[:, :, S:], v[:, :, S:], False)
        blocks.merge_(o_r, l_r, o_p, l_p)
        out = torch.empty_like(q)
        out[:, :, :r].copy_(o_r)
        out[:, :, r:].copy_(rest)
        return out
    return f

def assemble_only():
    out = torch.empty_like(q)
    out[:, :, :r].copy_(q[:, :, :r])
    out[:, :, r:].copy_(q[:, :, r:])
    return out

cases = {
    "sdpa 128K / 2": (lambda: sdpa(qf, kf, vf), 0.5),
    "ring now (two 64K blocks + merge)": (ring_now, 1),
    "ring, seq-major K/V": (ring_seqmajor, 1),
    "gathered BHSD no lse": (gathered(k_bh, v_bh, False), 1),
    "gathered seq-major no lse": (gathered(k_sm, v_sm, False), 1),
    "gathered seq-major lse": (gathered(k_sm, v_sm, True), 1),
    "split r=2048 seq-major no lse": (gathered_split(k_sm, v_sm, False), 1),
    "split r=2048 BHSD no lse": (gathered_split(k_bh, v_bh, False), 1),
    "split r=2048 seq-major lse": (gathered_split(k_sm, v_sm, True), 1),
    "assemble output only": (assemble_only, 1),
}
def one(fn):
    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
    return time.perf_counter() - t0

calls = {}
for name, (fn, scale) in cases.items():
    one(fn)
    calls[name] = max(2, int(3.0 / one(fn)))  # about 3 s a round
results = {name: [] for name in cases}
for rnd, order in enumerate([list(cases), list(cases)[::-1], list(cases)]):
    for name in order:
        fn, scale = cases[name]
        for _ in range(max(1, calls[name] // 3)):  # a second of warm-up
            fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls[name]):
            fn()
        b.record(); b.synchronize()
        ms = a.elapsed_time(b) / calls[name] * scale
        results[name].append(ms)
        print(f"{time.strftime('%H:%M:%S')} round {rnd} {name}: {ms:.3f} ms ({calls[name]} calls)", flush=True)
print()
base = sorted(results["sdpa 128K / 2"])[1]
for name, xs in results.items():
    med = sorted(xs)[1]
    print(f"{name:40s} median of 3 rounds {med:8.3f} ms  efficiency {base / med:.4f}  rounds {' '.join(f'{x:.3f}' for x in xs)}")
