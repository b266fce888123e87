"""Reads the traces probe_ring_profile.py exported (ring-profile/*.json.gz) and says, per rank and pass, for
the last of the three profiled calls: the compute stream's kernels by kind (block attention, merge, copies,
other), the NCCL kernels (their grid: the SMs each holds while it runs) and how much of their time ran
beside a block kernel, and the compute stream's idle time within the call."""
import collections
import gzip
import json
import sys
from pathlib import Path


def kind(name):
    n = name.lower()
    if "nccl" in n:
        return "nccl"
    if "merge" in n:
        return "merge"
    if any(s in n for s in ("cudnn", "flash", "fmha", "sm90", "attn", "sdpa")):
        return "attention"
    if any(s in n for s in ("memcpy", "memset", "copy")):
        return "copy"
    return "other"


def last_call(events):
    """The kernels of the last profiled call: after the second last of the barriers (an NCCL all-reduce)
    that end each call, before the last."""
    events = sorted(events, key=lambda e: e["ts"])
    barriers = [i for i, e in enumerate(events) if "AllReduce" in e["name"]]
    return events[barriers[-2] + 1 : barriers[-1]]


def report(path):
    trace = json.load(gzip.open(path))
    kernels = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    call = last_call(kernels)
    start, end = call[0]["ts"], max(e["ts"] + e["dur"] for e in call)
    compute = [e for e in call if kind(e["name"]) != "nccl"]
    nccl = [e for e in call if kind(e["name"]) == "nccl"]
    by_kind = collections.Counter()
    for e in compute:
        by_kind[kind(e["name"])] += e["dur"]
    attention = [(e["ts"], e["ts"] + e["dur"]) for e in compute if kind(e["name"]) == "attention"]
    beside = sum(max(0, min(e["ts"] + e["dur"], b) - max(e["ts"], a)) for e in nccl for a, b in attention)
    busy = sum(e["dur"] for e in compute)
    grids = sorted({str(e.get("args", {}).get("grid")) for e in nccl})
    print(f"{Path(path).name}: call {(end - start) / 1000:.2f} ms; compute stream busy {busy / 1000:.2f} ms, "
          f"idle {(end - start - busy) / 1000:.2f} ms")
    for name, us in by_kind.most_common():
        count = sum(1 for e in compute if kind(e["name"]) == name)
        print(f"   {name:9} {us / 1000:9.3f} ms in {count} kernels")
    print(f"   nccl      {sum(e['dur'] for e in nccl) / 1000:9.3f} ms in {len(nccl)} kernels, grid {grids} "
          f"(of 132 SMs), {beside / 1000:.3f} ms of it beside a block kernel")


for path in sorted(Path(sys.argv[1] if len(sys.argv) > 1 else "ring-profile").glob("*.json.gz")):
    report(path)
