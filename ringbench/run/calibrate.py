"""What the scaling model needs from the machine and no cell measures: how long the ring's transfer
and the all-to-all take at each message size, what a merge costs, and how much a block kernel slows
while a transfer runs beside it; and where the ranks can use copy-engine transfers, the ring's
transfer and the slowdown beside it with those.

A worker of several processes measures these once per world size before its first cell, through
the same calls the implementations make: the ring step through ``WaitClock.exchange``, the
all-to-all through ``ulysses.to_heads`` (a piece per head per peer, the rows a rank keeps copied:
on two H200s at 128K tokens that took 1.7 times as long as one piece per peer of the same bytes,
``results/evidence/probes/probe_a2a.txt``); rank 0
stores them in the run folder (``records.write_calibration``). Raw points are stored, not fitted
figures: the report fits them (``report.model``), so a better fit needs no new run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringbench.attention import blocks, peer_copy
from ringbench.attention.comm import WaitClock
from ringbench.attention.impls.ulysses import to_heads
from ringbench.run.distributed import OneProcess, local_world_size
from ringbench.run.timing import HOLD_MS, MAX_PROBE_HOLD_MS, hold_gpu

# Message sizes per rank, in bytes: from where latency dominates to where bandwidth does (the
# all-to-all's, to the nearest whole row of its shard).
# The CPU's (gloo) stop early: there the figures only exercise the path, and tests run it.
SIZES = {"cuda": [2**exponent for exponent in range(12, 29, 2)], "cpu": [2**exponent for exponent in range(12, 21, 4)]}
REPEATS = {"cuda": 7, "cpu": 3}
# The merge's accumulator: float32 (batch 1, 16 heads, ROWS rows, head_dim 128), MERGE_MIB of it.
MERGE_ROWS = {"cuda": 32768, "cpu": 1024}
# The block kernel timed alone and beside transfers: bf16 attention of this many rows (about 4 ms on
# an H200), beside a stream of ring transfers of the largest size.
CONTENTION_ROWS = 16384
CONTENTION_HOLD_MS = 10.0  # far longer than the host takes to post the transfers and queue the kernel
CONTENTION_TRANSFERS = 4  # enough to outlast the kernel
# The all-to-all's sequence shards: as the sweeps' usual shape has them (16 heads, or one a rank
# where 16 do not divide among the ranks), head_dim 128, in the blocks' dtype on a GPU.
ALL_TO_ALL_HEADS, ALL_TO_ALL_HEAD_DIM = 16, 128
ALL_TO_ALL_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def _timed_ms(fn: Callable[[], object], device: torch.device, group: OneProcess, repeats: int) -> float:
    """The median over ``repeats`` calls of the slowest rank's time for one call of ``fn``, every call
    started together (after a barrier), after one call that is not timed.

    On a GPU each call is queued while a hold keeps the GPU busy, so that its events time the GPU's
    work, not the host's posting of it: the host takes 0.9 ms to post `ulysses`' all-to-all of one
    tensor at any size (``probe_a2a.txt``), which in a stream of calls overlaps the GPU's work, and
    which a cell's own launch probe measures where it does not (the model's host-paced cells).
    """
    fn()
    hold_ms = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        hold_ms = group.max(min(2e3 * (time.perf_counter() - begin) + HOLD_MS[0], MAX_PROBE_HOLD_MS))
    times = []
    for _ in range(repeats):
        group.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            hold_gpu(hold_ms)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter_ns()
            fn()
            elapsed = (time.perf_counter_ns() - begin) / 1e6
        times.append(group.max(elapsed))
    return statistics.median(times)


# A pattern makes, for about ``size`` bytes sent by each rank, one call of it and the bytes it sends.
Pattern = Callable[[WaitClock, OneProcess, int], tuple[Callable[[], object], int]]


def _ring_step(buffers: peer_copy.PeerBuffers | None = None) -> Pattern:
    """One ring step's transfer: to the next rank, from the previous; with ``buffers``, by the copy
    engine into the front of their first slot."""

    def make(clock: WaitClock, group: OneProcess, size: int) -> tuple[Callable[[], object], int]:
        send = torch.empty(size, dtype=torch.uint8, device=group.device)
        receive = buffers.slots[0][:size] if buffers else torch.empty_like(send)
        after, before = _neighbours(group)
        return lambda: clock.wait(clock.exchange(send, receive, after, before, through=buffers)), size

    return make


def _neighbours(group: OneProcess) -> tuple[int, int]:
    """The ranks a ring step sends to and receives from."""
    return (group.rank + 1) % group.world_size, (group.rank - 1) % group.world_size


def _all_to_all(clock: WaitClock, group: OneProcess, size: int) -> tuple[Callable[[], object], int]:
    """`ulysses`' all-to-all of one sequence shard into a head shard, its rows chosen so that this rank
    sends about ``size`` bytes to the others."""
    processes = group.world_size
    heads = ALL_TO_ALL_HEADS if ALL_TO_ALL_HEADS % processes == 0 else processes
    dtype = ALL_TO_ALL_DTYPE[group.device.type]
    row_bytes = heads * ALL_TO_ALL_HEAD_DIM * dtype.itemsize * (processes - 1) // processes
    rows = max(1, round(size / row_bytes))
    shard = torch.zeros(1, heads, rows, ALL_TO_ALL_HEAD_DIM, dtype=dtype, device=group.device)
    return lambda: to_heads([shard], clock).arrived(), rows * row_bytes


def _curve(make: Pattern, group: OneProcess) -> dict[str, list]:
    kind = group.device.type
    clock = WaitClock(group.device)
    sent, times = [], []
    for size in SIZES[kind]:
        call, nbytes = make(clock, group, size)
        sent.append(nbytes)
        times.append(_timed_ms(call, group.device, group, REPEATS[kind]))
    return {"bytes": sent, "ms": times}


def _merge(group: OneProcess) -> dict[str, Any]:
    """One merge of a block into a float32 accumulator, timed on this rank: the path the ring takes here."""
    device, rows = group.device, MERGE_ROWS[group.device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    acc = torch.zeros(1, 16, rows, 128, dtype=torch.float32, device=device)
    acc_lse = torch.zeros(1, 16, rows, dtype=torch.float32, device=device)
    out = torch.randn(1, 16, rows, 128, dtype=dtype, device=device)
    lse = torch.randn(1, 16, rows, dtype=torch.float32, device=device)
    ms = _timed_ms(lambda: blocks.merge_(acc, acc_lse, out, lse), device, group, REPEATS[device.type])
    return {"accumulator_mib": acc.numel() * 4 / 2**20, "ms": ms, "path": blocks.merge_path(device)}


def _contention(group: OneProcess, buffers: peer_copy.PeerBuffers | None = None) -> dict[str, float] | None:
    """A bf16 attention kernel's time alone, and while ring transfers of the largest size run beside
    it (NCCL's, or with ``buffers`` the copy engine's into their slots, one a transfer), on every
    rank at once. On the CPU no separate engine is shared: None."""
    device = group.device
    if device.type != "cuda":
        return None
    q = torch.randn(1, 16, CONTENTION_ROWS, 128, dtype=torch.bfloat16, device=device)
    send = torch.empty(SIZES["cuda"][-1], dtype=torch.uint8, device=device)
    receives = buffers.slots if buffers else [torch.empty_like(send)] * CONTENTION_TRANSFERS
    clock = WaitClock(device)
    after, before = _neighbours(group)
    alone = _timed_ms(lambda: F.scaled_dot_product_attention(q, q, q), device, group, REPEATS["cuda"])
    beside = []
    for _ in range(REPEATS["cuda"] + 1):
        group.barrier()
        # Queued behind a hold, as the calls _timed_ms times alone are (NCCL's stream waits for the
        # compute stream when a transfer is posted): the kernel and the transfers start together.
        hold_gpu(CONTENTION_HOLD_MS)
        # Posted first, enough transfers to outlast the kernel, waited for only after it.
        posted = [
            request for receive in receives for request in clock.exchange(send, receive, after, before, through=buffers)
        ]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        F.scaled_dot_product_attention(q, q, q)
        end.record()
        clock.wait(posted)
        torch.cuda.synchronize(device)
        beside.append(group.max(start.elapsed_time(end)))
    return {"alone_ms": alone, "beside_transfers_ms": statistics.median(beside[1:])}


def _copy_engine(group: OneProcess) -> dict[str, Any] | None:
    """The ring step's curve and the contention as above with copy-engine transfers, where the ranks
    can use them (``peer_copy.unavailable``); None elsewhere. Its buffers: one slot a transfer of
    the contention's, each of the largest message."""
    if group.world_size == 1 or peer_copy.unavailable(group.device):
        return None
    assert dist.group.WORLD is not None, "across processes there is a default group"
    buffers = peer_copy.PeerBuffers(
        (SIZES["cuda"][-1],), CONTENTION_TRANSFERS, torch.uint8, group.device, dist.group.WORLD
    )
    return {"ring_step": _curve(_ring_step(buffers), group), "contention": _contention(group, buffers)}


def measure(group: OneProcess) -> dict[str, Any]:
    """This world size's calibration, measured on every rank of ``group`` together; its buffers
    are handed back to the device before the first cell."""
    measured = {
        "world_size": group.world_size,
        "ranks_per_host": local_world_size(),
        "device": torch.cuda.get_device_name(group.device) if group.device.type == "cuda" else "cpu",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ring_step": _curve(_ring_step(), group),
        "all_to_all": _curve(_all_to_all, group),
        "merge": _merge(group),
        "contention": _contention(group),
        "copy_engine": _copy_engine(group),
    }
    if group.device.type == "cuda":
        torch.cuda.empty_cache()
    return measured
