"""The in-place Triton merges, before (kernels as at a0fc21f, .gpu/*_old.py) and after a barrier
between their loads and stores: each run on final inputs, against the eager merge on clones."""
import importlib.util, os, sys
import torch
from ringbench.attention import blocks, fused_merge, fused_dilated


def load(name):
    spec = importlib.util.spec_from_file_location(name, f".gpu/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRIALS = int(os.environ.get("TRIALS", 300))
kernels = {"old": load("fused_merge_old"), "new": fused_merge}
dev = torch.device("cuda", 0)
B, H, S, D = 1, int(os.environ.get("H", 4)), int(os.environ.get("S", 8192)), int(os.environ.get("D", 64))
for acc_dtype in (torch.bfloat16, torch.float32):
    for name, module in kernels.items():
        bad = rows_bad = 0
        for trial in range(TRIALS):
            g = torch.Generator(device=dev).manual_seed(trial)
            q, k0, v0, k1, v1 = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(5))
            acc, acc_lse = blocks.attend("flash", q, k0, v0, False)
            acc = acc.to(acc_dtype)
            out, lse = blocks.attend("flash", q, k1, v1, False)
            torch.cuda.synchronize()
            clones = [t.clone() for t in (acc, acc_lse, out, lse)]
            module.merge_(acc, acc_lse, out, lse)
            blocks._merge(*clones)
            torch.cuda.synchronize()
            rows = ((acc.float() - clones[0].float()).abs().amax(dim=-1) > 1e-3).sum().item()
            rows += ((acc_lse - clones[1]).abs() > 1e-4).sum().item() if rows == 0 else 0
            bad += rows > 0
            rows_bad += rows
        print(f"merge {name} acc {acc_dtype}: {bad} of {TRIALS} wrong ({rows_bad} rows)", flush=True)

if os.environ.get("MERGE_ONLY"):
    sys.exit()
old_dilated = load("fused_dilated_old")
for name, module in (("old", old_dilated), ("new", fused_dilated)):
    for causal in (False, True):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, 8, 16384, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        patterns = [(2048, 1, 4), (4096, 2, 4), (8192, 4, 4)]  # (w, r, parts): merges into every row
        ref, ref_lse = module.forward(q, k, v, patterns, causal)
        torch.cuda.synchronize()
        spread = bad = 0
        for trial in range(200):
            acc, lse = module.forward(q, k, v, patterns, causal)
            torch.cuda.synchronize()
            d = (acc - ref).abs().max().item()
            spread = max(spread, d)
            bad += d > 1e-4
        print(f"dilated {name} causal={causal}: {bad} of 200 runs differ from the first (max {spread:.2e})", flush=True)
