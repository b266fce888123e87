"""Two H200s, 128K tokens, bf16, B=1 H=16 D=128, cuDNN, non-causal forward: a ring of two whose rank keeps
its own K/V in the front half of each head of one symmetric buffer, the peer's copy engine writing its K/V
into the back half (one contiguous copy per head of K and of V). The first R query rows attend the own keys
(with the log-sum-exp) while the transfer runs; the rest attend all 128K keys in one call without it; the
first R rows' peer block merges in; the output is put together. Against `ring` as ringbench sets it up,
both GPUs at once, each variant CALLS calls back to back, ROUNDS rounds (the middle reversed), clocks read
through NVML; efficiency against SDPA at 128K on rank 0's GPU with the other idle, halved."""
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
        dist.barrier()
    return a.elapsed_time(b) / calls, watch.state(rank)


generator = torch.Generator(device=dev).manual_seed(rank)
q = torch.randn(1, H, half, D, device=dev, dtype=bf16, generator=generator)
buffers = peer_copy.PeerBuffers((2, 1, H, 2 * half, D), 1, bf16, dev, dist.group.WORLD)
(gathered,) = buffers.slots
gathered[:, :, :, :half].copy_(torch.randn(2, 1, H, half, D, device=dev, dtype=bf16, generator=generator))
torch.cuda.synchronize()
dist.barrier()
nxt, prev = (rank + 1) % P, (rank - 1) % P
stream = buffers._stream
FREE, READY = peer_copy.FREE, peer_copy.READY
peer = buffers._handle.get_buffer(nxt, tuple(gathered.shape), bf16, 0)


def send():
    """The own K/V into the back half of the next rank's buffer, head by head; returns the arrival."""
    stream.wait_stream(torch.cuda.current_stream())
    peer_copy._raise_flag(stream, buffers._flag(prev, 0, FREE))
    peer_copy._take_flag(stream, buffers._flag(rank, 0, FREE, writer=nxt))
    with torch.cuda.stream(stream):
        for kv in range(2):
            for head in range(H):
                peer[kv, 0, head, half:].copy_(gathered[kv, 0, head, :half])
    peer_copy._raise_flag(stream, buffers._flag(nxt, 0, READY))
    return peer_copy.Arrival(buffers._flag(rank, 0, READY, writer=prev))


def no_lse(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0]


def split(rows):
    arrival = send()
    own_k, own_v = gathered[0][:, :, :half], gathered[1][:, :, :half]
    first, first_lse = blocks.attend("cudnn", q[:, :, :rows], own_k, own_v, False)
    arrival.wait()
    rest = no_lse(q[:, :, rows:], gathered[0], gathered[1])
    peer_block, peer_lse = blocks.attend(
        "cudnn", q[:, :, :rows], gathered[0][:, :, half:], gathered[1][:, :, half:], False
    )
    blocks.merge_(first, first_lse, peer_block, peer_lse)
    return torch.cat([first, rest], dim=2)


def whole():
    """All rows over all keys in one call, after the whole transfer: the transfer exposed."""
    send().wait()
    return no_lse(q, gathered[0], gathered[1])


impl = Registry.bundled().get("ring")
options = impl.resolve_options({"kernel": "cudnn", "zigzag": True, "transfers": "copy-engine"}, "ring")
cell = Cell("ring", tuple(sorted(options.items())), S, P, 1, H, D, "bfloat16", False, "forward", P)
ring_run = pipeline._as_bench(impl.setup(pipeline.make_problem(cell, dev, 0, rank))).run

with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    # The gathered forms against SDPA over the same keys, once the peer's half is in.
    whole()
    torch.cuda.synchronize()
    dist.barrier()
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # cuDNN takes no float32
        reference = F.scaled_dot_product_attention(q.float(), gathered[0].float(), gathered[1].float())
    for rows in (2048, 4096):
        error = ((split(rows).float() - reference).norm() / reference.norm()).item()
        say(f"split r={rows}: relative error against float32 SDPA over the same keys {error:.2e}")
    error = ((whole().float() - reference).norm() / reference.norm()).item()
    say(f"whole: relative error {error:.2e}")
    del reference
    full = torch.randn(1, H, S, D, device=dev, dtype=bf16)

    def sdpa():
        return F.scaled_dot_product_attention(full, full, full)

    variants = {
        "sdpa 128K alone (rank 0)": (sdpa, SDPA_CALLS, rank == 0),
        "ring ce (ringbench)": (ring_run, RING_CALLS, True),
        "gathered split r=2048": (lambda: split(2048), RING_CALLS, True),
        "gathered split r=4096": (lambda: split(4096), RING_CALLS, True),
        "gathered whole, transfer exposed": (whole, RING_CALLS, True),
    }
    for name, (fn, calls, active) in variants.items():
        timed(fn, 2, active)
    results = {name: [] for name in variants}
    for round_ in range(ROUNDS):
        order = list(variants) if round_ != 1 else list(reversed(variants))
        for name in order:
            fn, calls, active = variants[name]
            ms, state = timed(fn, calls, active)
            results[name].append((ms, state))
            clock = f"{state.sm_clock_mhz:.0f} MHz, {state.power_w:.0f} W, {state.temperature_c:.0f} C" if state else "no clocks"
            say(f"round {round_} {name}: {ms:.3f} ms per call; {clock}")

alone = statistics.median(ms for ms, _ in results["sdpa 128K alone (rank 0)"]) / 2
for name, runs in results.items():
    ms = statistics.median(m for m, _ in runs)
    mhz = statistics.median(s.sm_clock_mhz for _, s in runs if s)
    say(f"{name:34s} median {ms:8.3f} ms  clock {mhz:6.0f} MHz  over SDPA/2 {alone / ms if rank == 0 else float('nan'):.4f}  rounds {' '.join(f'{m:.3f}' for m, _ in runs)}")
dist.destroy_process_group()
