"""Two H200s, 128K tokens, bf16, B=1 H=16 D=128, cuDNN, non-causal forward: why the copy-engine ring of
two runs its GPUs at a lower SM clock than single-GPU SDPA, and whether pacing the transfer changes it.

Each variant runs CALLS calls back to back on both GPUs at once (CUDA events around the loop, mean per
call), its clocks read through NVML (ringbench.run.clocks.Watch) while it runs; ROUNDS rounds, the
middle one in reverse order. Variants:
- sdpa 128K alone: rank 0 runs the single-GPU cell's call, rank 1 idles;
- sdpa 128K both: both GPUs run it at once;
- ring ce / ring nccl: zigzag ring as ringbench sets it up (bench.run);
- manual k=1 copy: the ring of two's copy-engine forward written out here (own block, then the received
  block, merged in place); k=1 no copy: the same with the transfer's flags but no bytes;
- manual k=4: the own block as 4 calls on a quarter of the query rows each, the transfer in 4 pieces,
  all queued at once (unpaced) or piece i behind call i-1 (paced), so that the copy engine's load is
  spread over the own block.
"""
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringbench.attention import blocks, peer_copy
from ringbench.attention.registry import Registry
from ringbench.run import clocks, pipeline
from ringbench.vocabulary import Cell

rank, P = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
S, H, D, ROUNDS = 131072, 16, 128, 3
RING_CALLS, SDPA_CALLS = 30, 15
half = S // P
bf16 = torch.bfloat16
gauge = clocks.nvml_of(dev)


def say(text):
    print(f"{time.strftime('%H:%M:%S')} [r{rank}] {text}", flush=True)


def timed(fn, calls, active=True):
    """ms per call over ``calls`` calls back to back, and the GPU's state meanwhile; both ranks start together."""
    torch.cuda.synchronize()
    dist.barrier()
    watch = clocks.Watch(gauge)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with watch:
        a.record()
        if active:
            for _ in range(calls):
                fn()
        b.record()
        torch.cuda.synchronize()
        dist.barrier()  # an idle rank is read for as long as the other works
    return a.elapsed_time(b) / calls, watch.state(rank)


# --- the manual ring of two over copy-engine buffers ---
q = torch.randn(1, H, half, D, device=dev, dtype=bf16)
kv = torch.randn(2, 1, H, half, D, device=dev, dtype=bf16)
buffers = peer_copy.PeerBuffers(kv.shape, 1, bf16, dev, dist.group.WORLD)
(slot,) = buffers.slots
nxt, prev = (rank + 1) % P, (rank - 1) % P
stream = buffers._stream
scratch = torch.empty(kv.numel(), device=dev, dtype=bf16)  # a copy that stays on the GPU
FREE, READY = peer_copy.FREE, peer_copy.READY


def manual(pieces, paced, copy=True, share=1.0, local=False):
    compute = torch.cuda.current_stream()
    stream.wait_stream(compute)
    peer_copy._raise_flag(stream, buffers._flag(prev, 0, FREE))
    peer_copy._take_flag(stream, buffers._flag(rank, 0, FREE, writer=nxt))
    target = scratch if local else buffers._handle.get_buffer(nxt, (kv.numel(),), bf16, 0)
    sends, receives = kv.view(-1).chunk(pieces), target.chunk(pieces)
    if copy:
        with torch.cuda.stream(stream):
            for _ in range(int(share) or 1):  # the message copied once, twice, or its first `share` of it
                count = int(min(share, 1.0) * sends[0].numel())
                receives[0][:count].copy_(sends[0][:count])
    rows = [slice(i * half // pieces, (i + 1) * half // pieces) for i in range(pieces)]
    events, outs = [], []
    for r in rows:
        outs.append(blocks.attend("cudnn", q[:, :, r], kv[0], kv[1], False))
        events.append(torch.cuda.Event())
        events[-1].record(compute)
    if copy:
        for i in range(1, pieces):
            if paced:
                stream.wait_event(events[i - 1])
            with torch.cuda.stream(stream):
                receives[i].copy_(sends[i])
    peer_copy._raise_flag(stream, buffers._flag(nxt, 0, READY))
    peer_copy.Arrival(buffers._flag(rank, 0, READY, writer=prev)).wait()
    out, lse = blocks.attend("cudnn", q, slot[0], slot[1], False)
    for (acc, acc_lse), r in zip(outs, rows):
        blocks.merge_(acc, acc_lse, out[:, :, r], lse[:, :, r])
    return outs


impl = Registry.bundled().get("ring")


def ring_bench(transfers):
    options = impl.resolve_options({"kernel": "cudnn", "zigzag": True, "transfers": transfers}, "ring")
    cell = Cell("ring", tuple(sorted(options.items())), S, P, 1, H, D, "bfloat16", False, "forward", P)
    problem = pipeline.make_problem(cell, dev, 0, rank)
    return pipeline._as_bench(impl.setup(problem)).run


with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    full = torch.randn(1, H, S, D, device=dev, dtype=bf16)

    def sdpa():
        return F.scaled_dot_product_attention(full, full, full)

    by_bytes = {
        "sdpa 128K alone (rank 0)": (sdpa, SDPA_CALLS, rank == 0),
        "manual k=1 no copy": (lambda: manual(1, False, copy=False), RING_CALLS, True),
        "manual k=1 copy 1/4": (lambda: manual(1, False, share=0.25), RING_CALLS, True),
        "manual k=1 copy 1/2": (lambda: manual(1, False, share=0.5), RING_CALLS, True),
        "manual k=1 copy": (lambda: manual(1, False), RING_CALLS, True),
        "manual k=1 copy twice": (lambda: manual(1, False, share=2.0), RING_CALLS, True),
        "manual k=1 copy to own GPU": (lambda: manual(1, False, local=True), RING_CALLS, True),
    }
    variants = by_bytes if os.environ.get("PROBE") == "bytes" else {
        "sdpa 128K alone (rank 0)": (sdpa, SDPA_CALLS, rank == 0),
        "sdpa 128K both": (sdpa, SDPA_CALLS, True),
        "ring ce (ringbench)": (ring_bench("copy-engine"), RING_CALLS, True),
        "ring nccl (ringbench)": (ring_bench("nccl"), RING_CALLS, True),
        "manual k=1 copy": (lambda: manual(1, False), RING_CALLS, True),
        "manual k=1 no copy": (lambda: manual(1, False, copy=False), RING_CALLS, True),
        "manual k=4 unpaced": (lambda: manual(4, False), RING_CALLS, True),
        "manual k=4 paced": (lambda: manual(4, True), RING_CALLS, True),
    }
    for name, (fn, calls, active) in variants.items():  # warm-up: kernel selection, first allocations
        timed(fn, 2, active)
    results = {name: [] for name in variants}
    for round_ in range(ROUNDS):
        order = list(variants) if round_ != 1 else list(reversed(variants))
        for name in order:
            fn, calls, active = variants[name]
            ms, state = timed(fn, calls, active)
            results[name].append((ms, state))
            clock = f"{state.sm_clock_mhz:.0f} MHz (min {state.sm_clock_min_mhz:.0f}), {state.power_w:.0f} W, {state.temperature_c:.0f} C, {','.join(state.held_by)}" if state else "no clocks"
            say(f"round {round_} {name}: {ms:.3f} ms per call; {clock}")

reference = statistics.median(ms for ms, _ in results["sdpa 128K alone (rank 0)"]) / 2
say(f"SDPA 128K alone on rank 0's GPU, halved (rank 0's figure is the reference): {reference:.3f} ms")
for name, runs in results.items():
    ms = statistics.median(m for m, _ in runs)
    mhz = statistics.median(s.sm_clock_mhz for _, s in runs if s)
    say(f"{name:28s} median {ms:8.3f} ms  clock {mhz:6.0f} MHz  rounds {' '.join(f'{m:.3f}' for m, _ in runs)}")
dist.destroy_process_group()
