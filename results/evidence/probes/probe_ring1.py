"""One H200, 64K, bf16, B=1 H=16 D=128, cuDNN: one-device ring forward against sdpa, and where its time goes."""
import statistics, sys, collections
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from ringbench.attention.registry import Registry, Problem
from ringbench.attention.inputs import Generated
dev = torch.device("cuda", 0)
S, H, D = 65536, 16, 128
reg = Registry.bundled()

def loop(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)

def ring(causal, size, zigzag):
    impl = reg.get("ring")
    opts = impl.resolve_options({"kernel": "cudnn", "zigzag": zigzag}, "ring")
    problem = Problem(inputs=Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False), causal=causal,
                      ring_size=size, options=opts)
    bench = impl.setup(problem)
    return bench.run

def profile(fn, label):
    from torch.profiler import profile as prof, ProfilerActivity
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    cats = collections.Counter(); counts = collections.Counter()
    for e in p.events():
        if e.device_type.name != "CUDA": continue
        n = e.name.lower()
        c = "attention" if ("cudnn" in n or "fmha" in n or "flash" in n or "sm90" in n or "attn" in n) else "merge" if "merge" in n else "copy/other"
        cats[c] += e.time_range.elapsed_us() / 1e3
        counts[c] += 1
    print(f"  profile {label}: " + ", ".join(f"{c} {cats[c]:.2f} ms in {counts[c]} kernels" for c in cats), flush=True)
    names = collections.Counter()
    for e in p.events():
        if e.device_type.name == "CUDA": names[e.name[:60]] += 1
    print("   kernels:", dict(names.most_common(6)), flush=True)

for causal in (False, True):
    inp = Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False)
    q, k, v = (inp.everything(n) for n in "qkv")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        base = loop(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    del q, k, v
    print(f"causal={causal} sdpa {base:.2f} ms", flush=True)
    for zigzag in (False, True):
        for size in (1, 4, 16):
            fn = ring(causal, size, zigzag)
            t = loop(fn)
            print(f"causal={causal} zigzag={zigzag} ring {size}: {t:.2f} ms ({t / base:.3f}x)", flush=True)
            if size > 1 and (zigzag or not causal):
                profile(fn, f"zigzag={zigzag} ring {size}")
            del fn
            torch.cuda.empty_cache()
