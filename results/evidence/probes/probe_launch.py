"""One GPU: how well the launch probe's host time predicts the pace of plain calls where the host is
the slower side. For host-bound forward cells (one-device `ring` and `ring-dilated` at ring sizes
2-16, `standard` and `sdpa`, 1K-8K tokens, bf16, B=1 H=16 D=128), three figures of the host's time
per call: `timing.launch_and_work`'s (one call queued behind a hold, median of 3), the same with
CALLS calls queued behind one hold, the first not counted (the host warm, as in a loop), and the
median of 200 plain calls back to back (CUDA events), which is the host's pace where it is the
slower. Each figure is the median over ROUNDS rounds, interleaved."""

import statistics
import time

import torch

from ringbench.attention.registry import Problem, Registry
from ringbench.run import timing

dev = torch.device("cuda", 0)
reg = Registry.bundled()
CALLS, ROUNDS = 4, 5


def warm_probe(fn):
    torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    hold = min(2e3 * (time.perf_counter() - begin) * CALLS + 1.0, 1000.0)
    timing._hold(hold)
    fn()
    queued = time.perf_counter()
    for _ in range(CALLS - 1):
        fn()
    host = 1e3 * (time.perf_counter() - queued) / (CALLS - 1)
    torch.cuda.synchronize()
    return host


def plain(fn, n=200):
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in pairs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in pairs)


cases = [("sdpa", {}, None, 1024), ("standard", {}, None, 1024)]
cases += [("ring", {}, rs, s) for s in (1024, 4096, 8192) for rs in (2, 4, 8, 16)]
cases += [("ring-dilated", {}, rs, s) for s in (1024, 4096) for rs in (2, 8, 16)]
for name, options, ring_size, seq_len in cases:
    q, k, v = (torch.randn(1, 16, seq_len, 128, dtype=torch.bfloat16, device=dev) for _ in range(3))
    impl = reg.get(name)
    resolved = impl.resolve_options(options, name)
    bench = impl.setup(Problem.of(q, k, v, causal=False, ring_size=ring_size, options=resolved))
    fn = bench.run if hasattr(bench, "run") else bench
    for _ in range(5):
        fn()
    one, warm, paced = [], [], []
    for _ in range(ROUNDS):
        one.append(timing.launch_and_work(fn, dev).host_ms)
        warm.append(warm_probe(fn))
        paced.append(plain(fn))
    one, warm, paced = (statistics.median(x) for x in (one, warm, paced))
    device_ms = timing.launch_and_work(fn, dev).device_ms
    print(f"{name:12} rs={ring_size} S={seq_len:5}: plain {paced:.3f} ms, device {device_ms:.3f}; "
          f"probe {one:.3f} ({one / paced:.2f}), warm probe {warm:.3f} ({warm / paced:.2f})", flush=True)
