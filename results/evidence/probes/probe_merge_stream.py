"""One process: does the Triton merge run in order after the block kernel it merges? The GPU is kept
busy by a sleep kernel so the host launches the block and the merge long before they run."""
import torch, triton
from ringbench.attention import blocks, fused_merge
dev = torch.device("cuda", 0)
print("triton", triton.__version__, "torch", torch.__version__)
print("torch stream", torch.cuda.current_stream().cuda_stream,
      "triton stream", triton.runtime.driver.active.get_current_stream(0))
B, H, S, D = 1, 4, 8192, 64
bad = 0
for trial in range(40):
    g = torch.Generator(device=dev).manual_seed(trial)
    q, k0, v0 = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    k1, v1 = (torch.randn(B, H, 4 * S + 64 * trial, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    torch.cuda.synchronize()
    acc, acc_lse = blocks.attend("flash", q, k0, v0, False)
    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time ahead of the host
    out, lse = blocks.attend("flash", q, k1, v1, False)
    fused_merge.merge_(acc, acc_lse, out, lse)
    torch.cuda.synchronize()
    a2, l2 = blocks.attend("flash", q, k0, v0, False)
    blocks._merge(a2, l2, out, lse)
    diff = (acc.float() - a2.float()).abs().max().item()
    bad += diff > 1e-2
    if trial < 3 or diff > 1e-2:
        print(f"trial {trial}: triton vs eager merge {diff:.2e}")
print(f"{bad} of 40 merges off by more than 1e-2")
