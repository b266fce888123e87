"""The Triton merge's time before and after the barrier (kernels as at a0fc21f, .gpu/fused_merge_old.py):
median of 50 calls after 5 warm-ups, CUDA events, the two interleaved call by call."""
import importlib.util, statistics
import torch
from ringbench.attention import fused_merge

spec = importlib.util.spec_from_file_location("fused_merge_old", ".gpu/fused_merge_old.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
dev = torch.device("cuda", 0)
for (B, H, S, D), acc_dtype in [((1, 16, 65536, 128), torch.float32), ((1, 16, 65536, 128), torch.bfloat16),
                                ((1, 4, 8192, 64), torch.float32)]:
    acc = torch.randn(B, H, S, D, device=dev, dtype=acc_dtype)
    acc_lse, lse = torch.randn(B, H, S, device=dev), torch.randn(B, H, S, device=dev)
    out = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    times = {"old": [], "new": []}
    for call in range(55):
        for name, module in (("old", old), ("new", fused_merge)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            module.merge_(acc, acc_lse, out, lse)
            end.record()
            end.synchronize()
            if call >= 5:
                times[name].append(start.elapsed_time(end))
    o, n = (statistics.median(times[k]) for k in ("old", "new"))
    print(f"merge {B}x{H}x{S}x{D} acc {acc_dtype}: before {o:.4f} ms, with the barrier {n:.4f} ms ({n / o:.3f}x)", flush=True)
