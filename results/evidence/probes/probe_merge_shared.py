"""One GPU shared by 2 processes, no communication between them on the GPU: each rank (or, with
BUSY=1, rank 0 only, while rank 1 keeps the GPU busy with sleep kernels) runs the Triton merge
on final inputs and compares it with the eager merge on clones of them. MERGE=eager checks the
eager merge twice instead."""
import os, time
import torch, torch.distributed as dist
from ringbench.attention import blocks, fused_merge
dist.init_process_group("gloo")
rank = dist.get_rank()
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
B, H, S, D = 1, 4, 8192, 64
busy = os.environ.get("BUSY") and rank == 1
merge = fused_merge.merge_ if os.environ.get("MERGE", "triton") == "triton" else blocks._merge
bad = wrong_rows = 0
if busy:
    end = time.time() + float(os.environ.get("SECONDS_BUSY", 20))
    while time.time() < end:
        torch.cuda._sleep(1_000_000)
        torch.cuda.synchronize()
else:
    for trial in range(int(os.environ.get("TRIALS", 200))):
        g = torch.Generator(device=dev).manual_seed(trial)
        q, k0, v0, k1, v1 = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(5))
        acc, acc_lse = blocks.attend("flash", q, k0, v0, False)
        out, lse = blocks.attend("flash", q, k1, v1, False)
        torch.cuda.synchronize()
        clones = [t.clone() for t in (acc, acc_lse, out, lse)]
        merge(acc, acc_lse, out, lse)
        blocks._merge(*clones)
        torch.cuda.synchronize()
        rows = ((acc.float() - clones[0].float()).abs().amax(dim=-1) > 1e-3).sum().item()
        bad += rows > 0
        wrong_rows += rows
print(f"[r{rank}] {'busy' if busy else f'{bad} of {trial + 1} merges wrong ({wrong_rows} rows)'}", flush=True)
dist.destroy_process_group()
