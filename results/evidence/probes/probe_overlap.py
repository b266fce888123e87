"""One H200, bf16, B=1 H=16 D=128, cuDNN: does a merge on a side stream hide behind the next step's block?"""
import statistics
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from ringbench.attention import blocks
from ringbench.attention.impls import ring as ringmod
from ringbench.attention.registry import Registry, Problem
from ringbench.attention.inputs import Generated

dev = torch.device("cuda", 0)
H, D = 16, 128
reg = Registry.bundled()


def loop(fn, n=15):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def forward(self, mode, priority):
    """_AllRanks.forward with the merge serial, on a side stream, or skipped."""
    q, k, v = (self._by_rank(t) for t in self.natural)
    acc = acc_lse = None
    main = torch.cuda.current_stream()
    side = STREAMS[priority]
    for step in range(self.ring_size):
        for run in ringmod.step_runs(step, self.ring_size, self.shard_len, self.causal, self.zigzag):
            ranks, kv_ranks = slice(run.first, run.first + run.count), slice(run.kv_first, run.kv_first + run.count)
            out, lse = blocks.attend(self.kernel, q[:, ranks, run.q_rows], k[:, kv_ranks, run.kv_rows], v[:, kv_ranks, run.kv_rows], run.causal)
            if acc is None:
                acc, acc_lse = out.float(), lse
            elif mode == "serial":
                blocks.merge_(acc[:, ranks, run.q_rows], acc_lse[:, ranks, run.q_rows], out, lse)
            elif mode == "side":
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    blocks.merge_(acc[:, ranks, run.q_rows], acc_lse[:, ranks, run.q_rows], out, lse)
                out.record_stream(side); lse.record_stream(side)
            del out, lse
    if mode == "side":
        main.wait_stream(side)
    del q, k, v
    shape = self.natural[0].shape
    return self._natural(acc, shape, self.dtype)


def one_rank(rows, P, mode, priority, causal=False):
    """One rank of a ring of P without transfers: its q shard against P K/V shards of ``rows`` rows."""
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, H, rows, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, H, rows, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    main, side = torch.cuda.current_stream(), STREAMS[priority]

    def call():
        acc = acc_lse = None
        for step in range(P):
            out, lse = blocks.attend("cudnn", q, k, v, causal and step == 0)
            if acc is None:
                acc, acc_lse = out.float(), lse
            elif mode == "serial":
                blocks.merge_(acc, acc_lse, out, lse)
            elif mode == "side":
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    blocks.merge_(acc, acc_lse, out, lse)
                out.record_stream(side); lse.record_stream(side)
            del out, lse
        if mode == "side":
            main.wait_stream(side)
        return acc.to(torch.bfloat16)
    return call


STREAMS = {}
lo, hi = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
STREAMS["low"] = torch.cuda.Stream(priority=0)
STREAMS["high"] = torch.cuda.Stream(priority=-1)
print("stream priorities: low 0, high -1", flush=True)

S = 65536
for causal in (False, True):
    inp = Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False)
    q, k, v = (inp.everything(n) for n in "qkv")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        base = loop(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    del q, k, v
    print(f"64K causal={causal} sdpa {base:.2f} ms", flush=True)
    for size in (4, 16):
        impl = reg.get("ring")
        opts = impl.resolve_options({"kernel": "cudnn", "zigzag": True}, "ring")
        problem = Problem(inputs=Generated((1, H, S, D), torch.bfloat16, dev, 0, requires_grad=False), causal=causal, ring_size=size, options=opts)
        bench = impl.setup(problem)
        current = loop(bench.run)
        ring = ringmod._AllRanks(problem, "cudnn", True)
        results = {}
        for mode, prio in (("serial", "low"), ("side", "low"), ("side", "high"), ("none", "low")):
            results[(mode, prio)] = loop(lambda: forward(ring, mode, prio))
        ref = forward(ring, "serial", "low"); got = forward(ring, "side", "low"); torch.cuda.synchronize()
        same = torch.equal(ref, got)
        print(f"  zigzag ring {size}: current {current:.2f} ({current/base:.3f}x); " + "; ".join(f"{m}/{p} {t:.2f} ({t/base:.3f}x)" for (m, p), t in results.items()) + f"; side == serial: {same}", flush=True)
        del bench, ring, problem

for rows, P in ((32768, 4), (16384, 8), (65536, 2), (65536, 4)):
    res = {}
    for mode, prio in (("serial", "low"), ("side", "low"), ("side", "high"), ("none", "low")):
        res[(mode, prio)] = loop(one_rank(rows, P, mode, prio))
    print(f"one rank, {rows} rows x {P} steps: " + "; ".join(f"{m}/{p} {t:.2f}" for (m, p), t in res.items()) + f"; merges serial cost {res[('serial','low')]-res[('none','low')]:.2f} ms, on a side stream {res[('side','low')]-res[('none','low')]:.2f}", flush=True)
