"""One H200, 64K, bf16, B=1 H=16 D=128, cuDNN: the one-device ring's merges on a side stream, beside the next block."""
import statistics
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from ringbench.attention import blocks
from ringbench.attention.impls import ring as ring_module
from ringbench.attention.registry import Registry, Problem
from ringbench.attention.inputs import Generated
dev = torch.device("cuda", 0)
S, H, D = 65536, 16, 128
reg = Registry.bundled()
side = torch.cuda.Stream(dev)
merge, natural = blocks.merge_, ring_module._AllRanks._natural

def merge_beside(acc, acc_lse, out, lse):
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        merge(acc, acc_lse, out, lse)
    out.record_stream(side); lse.record_stream(side)

def natural_after(self, x, shape, dtype):
    torch.cuda.current_stream().wait_stream(side)
    return natural(self, x, shape, dtype)

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
    return impl.setup(problem).run

for causal in (False, True):
    inp = Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False)
    q, k, v = (inp.everything(n) for n in "qkv")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        base = loop(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    del q, k, v
    for zigzag in (False, True):
        for size in (4, 16):
            fn = ring(causal, size, zigzag)
            inline = loop(fn)
            ref = fn()
            blocks.merge_, ring_module._AllRanks._natural = merge_beside, natural_after
            beside = loop(fn)
            same = torch.equal(fn(), ref)
            blocks.merge_, ring_module._AllRanks._natural = merge, natural
            print(f"causal={causal} zigzag={zigzag} ring {size}: sdpa {base:.2f}, merges inline {inline:.2f} ({inline / base:.3f}x), "
                  f"beside {beside:.2f} ({beside / base:.3f}x) same={same}", flush=True)
            del fn, ref
            torch.cuda.empty_cache()
