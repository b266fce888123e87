"""One GPU, 2 processes, ring's copy-engine forward; each merge is checked in place: the device is
synchronized, the merge's inputs cloned, the Triton merge run, and its result compared with the
Triton and the eager merge run again on the clones; the originals are compared with the clones
afterwards (did anything write them?), and their addresses with the symmetric buffers'."""
import os
os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
import torch, torch.distributed as dist
from ringbench.attention import blocks, fused_merge, peer_copy
from ringbench.attention.comm import WaitClock
from ringbench.attention.impls import ring

dist.init_process_group("gloo")
rank, P = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
B, H, S, D = 1, 4, int(os.environ.get("S", 16384)), 64
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
state = {}


def span(t):
    return t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()


def merge_(acc, acc_lse, out, lse):
    torch.cuda.synchronize()
    clones = [t.clone() for t in (acc, acc_lse, out, lse)]
    torch.cuda.synchronize()
    fused_merge.merge_(acc, acc_lse, out, lse)
    torch.cuda.synchronize()
    after = acc.clone()
    again = [t.clone() for t in clones]
    fused_merge.merge_(*again)
    eager = [t.clone() for t in clones]
    blocks._merge(*eager)
    torch.cuda.synchronize()
    bad = (after.float() - eager[0].float()).abs().amax(dim=-1) > 1e-3  # rows
    inputs_moved = [(o - c).abs().max().item() for o, c in zip((out, lse), clones[2:])]
    retriton = (again[0].float() - eager[0].float()).abs().max().item()
    handle = state["handle"]
    pads = [(p, p + getattr(handle, "signal_pad_size", 0)) for p in getattr(handle, "signal_pad_ptrs", [])]
    bufs = [(p, p + state["bytes"]) for p in getattr(handle, "buffer_ptrs", [])]
    hits = [name for name, t in zip(("acc", "acc_lse", "out", "lse"), (acc, acc_lse, out, lse))
            if any(a < span(t)[1] and span(t)[0] < b for a, b in pads + bufs)]
    if bad.any():
        where = bad.nonzero()
        print(f"[r{rank}] {state['label']}: triton merge wrong in {int(bad.sum())} of {bad.numel()} rows "
              f"(heads {sorted(set(where[:, 1].tolist()))}, rows {where[:, 2].min().item()}..{where[:, 2].max().item()}); "
              f"triton again on clones off by {retriton:.2e}; inputs changed after {inputs_moved}; "
              f"overlaps symmetric memory: {hits}; acc {acc.data_ptr():#x} strides {acc.stride()} "
              f"out {out.data_ptr():#x} lse {lse.data_ptr():#x} acc_lse {acc_lse.data_ptr():#x}", flush=True)
    state["merges"] += 1
    state["bad"] += bool(bad.any())


blocks.merge_ = merge_
state.update(merges=0, bad=0)
for trial in range(int(os.environ.get("TRIALS", 3))):
    for zigzag, causal in [(False, False), (True, True), (False, True)]:
        rows = ring.positions(S, P, zigzag, dev)[rank]
        qs = q[:, :, rows].contiguous()
        kv = torch.stack([k[:, :, rows], v[:, :, rows]]).contiguous()
        buffers = peer_copy.PeerBuffers(kv.shape, 1, kv.dtype, dev, dist.group.WORLD)
        state["handle"], state["bytes"] = buffers._handle, kv.nbytes
        peers = peer_copy.RingPeers(buffers, None)
        one = ring.OneRank(qs, kv, causal=causal, kernel="flash", zigzag=zigzag, comm=WaitClock(dev), rank=rank,
                           ring_size=P, send_to=(rank + 1) % P, receive_from=(rank - 1) % P,
                           received=peers.kv.slots, peers=peers)
        for call in range(2):
            state["label"] = f"trial {trial} zigzag={zigzag} causal={causal} call {call}"
            one.forward(keep_lse=True)
            torch.cuda.synchronize(dev)
        del one, peers, buffers
print(f"[r{rank}] {state['bad']} of {state['merges']} merges wrong", flush=True)
dist.barrier()
dist.destroy_process_group()
