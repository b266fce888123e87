# After a run: SDPA's cuDNN forward at 128K and the 64K block with its log-sum-exp, back to back for
# 8 s each on every GPU at once, means per second from CUDA events: the rate of a hot GPU.
import sys, time
import torch
import torch.multiprocessing as mp

def work(gpu):
    torch.cuda.set_device(gpu)
    from ringbench.attention import blocks
    def mk(s):
        return [torch.randn(1, 16, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    big, small = mk(131072), mk(65536)
    cases = {
        "sdpa128K": lambda: torch.nn.functional.scaled_dot_product_attention(*big),
        "block64K+lse": lambda: blocks.attend("cudnn", *small, False),
        "sdpa64K": lambda: torch.nn.functional.scaled_dot_product_attention(*small),
    }
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        for name, fn in cases.items():
            fn(); torch.cuda.synchronize()
            per_sec = []
            end = time.time() + 8
            while time.time() < end:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); n = 0; t0 = time.time()
                while time.time() - t0 < 1.0:
                    fn(); n += 1
                b.record(); b.synchronize()
                per_sec.append(a.elapsed_time(b) / n)
            print(f"gpu{gpu} {name}: " + " ".join(f"{x:.2f}" for x in per_sec), flush=True)

if __name__ == "__main__":
    n = torch.cuda.device_count()
    mp.spawn(work, nprocs=n)
