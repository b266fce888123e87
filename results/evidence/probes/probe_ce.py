"""Prototype: ulysses' forward with q, k, v pushed by the copy engines into peers' symmetric buffers,
beside the NCCL point-to-point form, at 128K on 2 GPUs: same output? faster? memory counted?"""
import os, statistics
import torch, torch.distributed as dist
import torch.nn.functional as F
import torch.distributed._symmetric_memory as symm_mem
from torch.nn.attention import sdpa_kernel, SDPBackend
from ringbench.attention.comm import WaitClock, post_swap
from ringbench.attention.impls.ulysses import HeadShards, UlyssesAttention, by_rank
from ringbench.attention.inputs import Generated

rank = int(os.environ["RANK"]); P = int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])); torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
say = lambda *a: print(f"[{rank}]", *a, flush=True)
S, H, D, B = 131072, 16, 128, 1
rows = S // P
CUDNN = [SDPBackend.CUDNN_ATTENTION]


def loop(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); dist.barrier()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


inputs = Generated((B, H, S, D), torch.bfloat16, dev, 0, requires_grad=False)
positions = torch.arange(rank * rows, (rank + 1) * rows, device=dev)
q, k, v = (inputs.rows(name, positions) for name in "qkv")
clock = WaitClock(dev)


class CopyEngineInbound:
    """Per chunk, a symmetric (3, B, h, S, D) buffer; peers push their rows of this rank's heads into it."""

    def __init__(self, chunks):
        self.chunks, self.hh = chunks, H // chunks // P
        before = torch.cuda.memory_allocated(dev)
        self.buf = symm_mem.empty((chunks, 3, B, self.hh, S, D), dtype=torch.bfloat16, device=dev)
        self.counted = torch.cuda.memory_allocated(dev) - before
        self.hdl = symm_mem.rendezvous(self.buf, dist.group.WORLD)
        self.remote = [self.hdl.get_buffer(j, self.buf.shape, self.buf.dtype) if j != rank else self.buf for j in range(P)]
        self.side = torch.cuda.Stream(dev)

    def send(self, chunk):
        per_chunk = H // self.chunks
        sources = [by_rank(t[:, chunk * per_chunk:(chunk + 1) * per_chunk], P) for t in (q, k, v)]
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self.hdl.barrier(channel=0)  # every rank's earlier attention on this buffer is done
            for j in [*(j for j in range(P) if j != rank), rank]:
                target = self.remote[j][chunk]
                for t, source in enumerate(sources):
                    for b in range(B):
                        for h in range(self.hh):
                            target[t, b, h, rank * rows:(rank + 1) * rows].copy_(source[b, j, h])
            self.hdl.barrier(channel=1)  # every push into every buffer is done
            done = torch.cuda.Event()
            done.record()
        return done

    def forward(self):
        outward = HeadShards.within(None, to_heads=False)
        inbound, outbound = self.send(0), []
        for chunk in range(self.chunks):
            arriving = inbound
            if chunk + 1 < self.chunks:
                inbound = self.send(chunk + 1)
            torch.cuda.current_stream().wait_event(arriving)
            qh, kh, vh = self.buf[chunk].unbind()
            with sdpa_kernel(CUDNN):
                out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
            outbound.append(post_swap([out], outward, clock))
        outputs = [f.arrived()[0].flatten(1, 2) for f in outbound]
        return outputs[0] if self.chunks == 1 else torch.cat(outputs, 1)


for causal in (False, True):
    qf, kf, vf = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(CUDNN):
        t16 = loop(lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal))
    del qf, kf, vf
    line = [f"causal={causal} sdpa H16 {t16:.2f}"]
    for chunks in [c for c in (1, 2, 4, 8) if H % (P * c) == 0]:
        sdpa = lambda a, b, c, causal=causal: F.scaled_dot_product_attention(a, b, c, is_causal=causal)
        nccl = UlyssesAttention(q, k, v, causal, chunks, "cudnn", sdpa, clock)
        def _nccl():
            with sdpa_kernel(CUDNN):
                return nccl.forward(False)[0]
        ce = CopyEngineInbound(chunks)
        same = torch.equal(_nccl(), ce.forward())
        tn, tc = loop(_nccl), loop(ce.forward)
        line.append(f"c={chunks}: nccl {tn:.2f} ({t16 / (P * tn):.4f}) ce {tc:.2f} ({t16 / (P * tc):.4f}) same={same} counted={ce.counted >> 20}MiB")
        del ce
    say(" | ".join(line))
dist.barrier()
dist.destroy_process_group()
