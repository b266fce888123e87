"""One H200: what a rank of a ring of two spends merging its two blocks at 128K tokens (64K rows,
16 heads, D=128, bf16): a float32 accumulator made, merged into and cast, against the second
block merged into the first's output in place. Same result bit for bit?"""
import statistics
import torch
from ringbench.attention import blocks

dev = torch.device("cuda", 0)
g = torch.Generator(device=dev).manual_seed(0)
shape = (1, 16, 65536, 128)
out0, out1 = (torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
lse0, lse1 = (torch.randn(shape[:3], device=dev, generator=g) * 3 for _ in range(2))


def accumulator():
    acc, acc_lse = out0.float(), lse0.clone()
    blocks.merge_(acc, acc_lse, out1, lse1)
    return acc.to(torch.bfloat16), acc_lse


def in_place():
    acc, acc_lse = out0.clone(), lse0.clone()  # the clones stand for the block outputs the kernel makes
    blocks.merge_(acc, acc_lse, out1, lse1)
    return acc, acc_lse


def clones():
    return out0.clone(), lse0.clone()


def timed(fn, n=30):
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


(a, al), (b, bl) = accumulator(), in_place()
differ = a != b
ulp = ((a.view(torch.int16).int() - b.view(torch.int16).int()).abs()).max().item()
print(f"merge path {blocks.merge_path(dev)}; same output bit for bit: {torch.equal(a, b)}, lse: {torch.equal(al, bl)}; "
      f"{differ.sum().item()} of {a.numel()} elements differ, by at most {ulp} bf16 ulp; "
      f"largest |difference| {(a.float() - b.float()).abs().max().item():.3e}")
for round_ in range(2):
    t_acc, t_in, t_clone = timed(accumulator), timed(in_place), timed(clones)
    print(f"round {round_}: accumulator {t_acc:.3f} ms, in place {t_in:.3f} ms (both include the first block's "
          f"clone, {t_clone:.3f} ms): saves {t_acc - t_in:.3f} ms a call")
