"""One GPU, P processes on it (gloo group; symmetric memory told to allow one device): ring's
copy-engine transfers against a float64 reference, forward and backward, several calls."""
import os, sys
os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
import torch, torch.distributed as dist
import torch.nn.functional as F
import torch.distributed._symmetric_memory as symm_mem
from ringbench.attention import blocks, fused_merge, peer_copy
if os.environ.get("EAGER"):
    fused_merge.AVAILABLE = False  # the eager merge, not the Triton kernel
from ringbench.attention.comm import WaitClock, sums_slots
from ringbench.attention.impls import ring
from ringbench.vocabulary import Cell

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
u = int(os.environ.get("RINGS", 1))  # rings of the ranks u apart, as usp's at Ulysses degree u
rings = [dist.new_group(list(range(i, world, u)), backend="gloo") for i in range(u)]
group, P, ring_rank, ulysses_index = rings[rank % u], world // u, rank // u, rank % u
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
print(f"[r{rank}] torch {torch.__version__} get_mem_pool={hasattr(symm_mem, 'get_mem_pool')}", flush=True)
B, H, S, D = 1, 4, int(os.environ.get('S', 2048)), 64
before = torch.cuda.memory_allocated(dev)
with torch.cuda.use_mem_pool(symm_mem.get_mem_pool(dev)):
    pooled = torch.empty(1 << 20, device=dev)
hdl = symm_mem.rendezvous(pooled, dist.group.WORLD)
print(f"[r{rank}] pooled symmetric 4 MiB counted={(torch.cuda.memory_allocated(dev) - before) / 2**20:.1f}MiB", flush=True)
del hdl, pooled
if os.environ.get("PARTS"):
    blocks.BACKWARD_PART_ROWS = S // 4  # parts of one head each at P=4, of two at P=2

KEPT = []
_merge = blocks.merge_


def _slow_merge(*args):
    import time
    time.sleep(1.0)
    _merge(*args)


g = torch.Generator(device=dev).manual_seed(0)
q, k, v, dout = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
for zigzag, causal in [(False, False), (True, True), (False, True)]:
    rows = ring.positions(S, P, zigzag, dev)[ring_rank]
    qs = q[:, :, rows].contiguous().requires_grad_()
    kv = torch.stack([k[:, :, rows], v[:, :, rows]]).contiguous()
    ks, vs = (t.requires_grad_() for t in kv.unbind())
    before = torch.cuda.memory_allocated(dev)
    part = blocks.backward_part_heads(B, S // P, H)
    count, narrow = sums_slots(P)
    peers = peer_copy.RingPeers(
        peer_copy.PeerBuffers(kv.shape, min(2, P - 1), kv.dtype, dev, group),
        peer_copy.PeerBuffers((2, B, part, S // P, D), count, blocks.gradient_dtype("flash", kv.dtype) if narrow else torch.float32, dev, group),
    )
    counted = (torch.cuda.memory_allocated(dev) - before) / 2**20
    one = ring.OneRank(qs, kv, causal=causal, kernel="flash", zigzag=zigzag, comm=WaitClock(dev), rank=ring_rank,
                       ring_size=P, send_to=(ring_rank + 1) % P * u + ulysses_index,
                       receive_from=(ring_rank - 1) % P * u + ulysses_index, received=peers.kv.slots, peers=peers)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)
    ref.backward(dout.double())
    worst, peaks = [], []
    if os.environ.get("KEEP"):
        KEPT.append((peers, one))  # the previous cases' buffers stay alive
    if os.environ.get("SYNC"):
        torch.cuda.synchronize(dev)
        dist.barrier()  # every rank done with setup and the reference before the first call
    dout_shard = dout[:, :, rows].contiguous()
    for call in range(4):
        for t in (qs, ks, vs):
            t.grad = None
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        if os.environ.get("SKEW") == str(rank) and call == 0:
            import time
            time.sleep(1.0)  # this rank starts the first call a second late
        if os.environ.get("HOSTSKEW") == str(rank) and call == 0:
            blocks.merge_ = _slow_merge  # this rank's host stalls in its first merge
        out = blocks.Differentiable.apply(qs, ks, vs, one)
        blocks.merge_ = _merge
        out.backward(dout_shard)
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        errs = [((a.double() - b[:, :, rows]).abs().max() / b[:, :, rows].abs().max()).item()
                for a, b in ((out, ref), (qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad))]
        worst.append(max(errs))
        if max(errs) > 1e-2:
            print(f"[r{rank}] call {call} zigzag={zigzag} causal={causal}: out, dq, dk, dv errors {' '.join(f'{e:.2e}' for e in errs)}", flush=True)
    cell = Cell("ring", (("kernel", "flash"), ("transfers", "copy-engine"), ("zigzag", zigzag)), S, world, B, H, D,
                "bfloat16", causal, "forward+backward", world_size=world)
    # The ring's own model (usp's rings, u > 1, hold what usp's model adds beside them).
    model = ring.memory_model(cell, {"kernel": "flash", "transfers": "copy-engine"}, 1)
    memory = f"; call peak {max(peaks) / 2**20:.2f} MiB, model {model / 2**20:.2f}" if u == 1 else ""
    kept = sum(slot.nbytes for slot in (*peers.kv.slots, *peers.sums.slots)) / 2**20
    print(f"[r{rank}] rings of {P} (u={u}) zigzag={zigzag} causal={causal} part_heads={part} rel errors per call "
          f"{' '.join(f'{e:.2e}' for e in worst)} counted={counted:.1f}MiB of {kept:.1f}{memory}", flush=True)
dist.barrier()
dist.destroy_process_group()
