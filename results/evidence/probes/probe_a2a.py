"""Two GPUs: an all-to-all as the calibration sends it (one piece per peer) against ulysses' own
to_heads (a piece per head per peer, the kept rows copied), bf16, 16 heads, D=128, by shard rows.
GPU time: CUDA events around post + wait, 20 calls queued back to back; host: the posting time."""
import os, statistics, time, torch, torch.distributed as dist
from ringbench.attention.comm import WaitClock
from ringbench.attention.impls import ulysses

dist.init_process_group("nccl")
rank, P = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", rank); torch.cuda.set_device(dev)
clock = WaitClock(dev)
H, D = 16, 128

def timed(fn, calls=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); dist.barrier()
    torch.cuda._sleep(int(50 * 2_000_000))  # hold the GPU while the host queues
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    t0 = time.perf_counter()
    for s, e in ev:
        s.record(); fn(); e.record()
    host = 1e3 * (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    gpu = statistics.median(s.elapsed_time(e) for s, e in ev)
    out = torch.tensor([gpu, host], device=dev); dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.tolist()

for rows in [1024, 4096, 8192, 16384, 32768, 65536]:
    shards = [torch.randn(1, H, rows, D, dtype=torch.bfloat16, device=dev) for _ in range(3)]
    sent = shards[0].numel() * 2 * (P - 1) // P
    piece = torch.empty(sent, dtype=torch.uint8, device=dev); recv = torch.empty_like(piece)
    one = lambda: clock.wait(clock.swap([(piece, recv, 1 - rank)]))
    three_piece = [torch.empty(sent * 3, dtype=torch.uint8, device=dev), torch.empty(sent * 3, dtype=torch.uint8, device=dev)]
    one3 = lambda: clock.wait(clock.swap([(three_piece[0], three_piece[1], 1 - rank)]))
    heads1 = lambda: ulysses.to_heads(shards[:1], clock).arrived()
    heads3 = lambda: ulysses.to_heads(shards, clock).arrived()
    res = {n: timed(f) for n, f in [("one piece", one), ("heads x1", heads1), ("one piece x3", one3), ("heads x3", heads3)]}
    if rank == 0:
        print(f"rows {rows} ({sent/2**20:.2f} MiB sent per tensor): " + "; ".join(f"{n} gpu {g:.3f} host {h:.3f} ms" for n, (g, h) in res.items()), flush=True)
dist.destroy_process_group()
