"""One GPU, 2 processes: ring's copy-engine forward, traced. Each trial builds new peer buffers
and a new OneRank per case and calls the forward twice; with TRACE=1 the step-1 block's K/V
are cloned just before and after the block, and its output and the merge's inputs/outputs kept,
so a wrong first call can be placed: data not yet arrived, block wrong on right data, or merge."""
import os
os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
import torch, torch.distributed as dist
import torch.nn.functional as F
from ringbench.attention import blocks, fused_merge, peer_copy
if os.environ.get("EAGER"):
    fused_merge.AVAILABLE = False
from ringbench.attention.comm import WaitClock
from ringbench.attention.impls import ring

dist.init_process_group("gloo")
rank, P = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
B, H, S, D = 1, 4, int(os.environ.get("S", 16384)), 64
TRACE, TRIALS = bool(os.environ.get("TRACE")), int(os.environ.get("TRIALS", 3))
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
trace = []
_attend, _merge = blocks.attend, blocks.merge_


def attend(kernel, qq, kk, vv, causal):
    before = (kk.clone(), vv.clone()) if TRACE else None
    out, lse = _attend(kernel, qq, kk, vv, causal)
    if TRACE:
        trace.append(("attend", qq, before, (kk.clone(), vv.clone()), out.clone(), lse.clone(), causal))
    return out, lse


def merge_(acc, acc_lse, out, lse):
    if os.environ.get("SYNCMERGE"):
        torch.cuda.synchronize()  # every queued kernel done before the merge is launched
    if TRACE:
        trace.append(("merge", acc.clone(), acc_lse.clone(), out, lse))
    _merge(acc, acc_lse, out, lse)
    if TRACE:
        trace.append(("merged", acc.clone(), acc_lse.clone()))


blocks.attend, blocks.merge_ = attend, merge_
refs = {}
for trial in range(TRIALS):
    for zigzag, causal in [(False, False), (True, True), (False, True)]:
        all_rows = ring.positions(S, P, zigzag, dev)
        rows = all_rows[rank]
        qs = q[:, :, rows].contiguous()
        kv = torch.stack([k[:, :, rows], v[:, :, rows]]).contiguous()
        other = all_rows[(rank - 1) % P]
        expected_kv = torch.stack([k[:, :, other], v[:, :, other]])
        if (zigzag, causal) not in refs:
            refs[zigzag, causal] = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        ref = refs[zigzag, causal][:, :, rows]
        peers = peer_copy.RingPeers(peer_copy.PeerBuffers(kv.shape, 1, kv.dtype, dev, dist.group.WORLD), None)
        one = ring.OneRank(qs, kv, causal=causal, kernel="flash", zigzag=zigzag, comm=WaitClock(dev), rank=rank,
                           ring_size=P, send_to=(rank + 1) % P, receive_from=(rank - 1) % P,
                           received=peers.kv.slots, peers=peers)
        for call in range(2):
            trace.clear()
            out, _ = one.forward(keep_lse=True)
            torch.cuda.synchronize(dev)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            note = ""
            if TRACE and one._block(1) is not None:
                steps = [t for t in trace if t[0] == "attend"]
                _, qq, before, after, bout, blse, bcausal = steps[1]
                # the step-1 block's K/V rows are a slice of the received shard: compare with the same slice
                spec = one._block(1)
                want = expected_kv[0][:, :, spec.kv_rows], expected_kv[1][:, :, spec.kv_rows]
                kv_before = max((a.float() - b.float()).abs().max().item() for a, b in zip(before, want))
                kv_after = max((a.float() - b.float()).abs().max().item() for a, b in zip(after, want))
                redo, _ = _attend("flash", qq, want[0], want[1], bcausal)
                block = (redo.float() - bout.float()).abs().max().item()
                m = [t for t in trace if t[0] == "merge"]
                if m:
                    _, acc0, lse0, mout, mlse = m[0]
                    _, acc1, lse1 = [t for t in trace if t[0] == "merged"][0]
                    acc0_ = acc0.clone(); lse0_ = lse0.clone()
                    blocks._merge(acc0_, lse0_, mout, mlse)
                    merge = (acc0_.float() - acc1.float()).abs().max().item()
                else:
                    merge = float("nan")
                note = f" kv-before {kv_before:.2e} kv-after {kv_after:.2e} block {block:.2e} merge {merge:.2e}"
            flag = "WRONG" if err > 1e-2 else "ok"
            print(f"[r{rank}] trial {trial} zigzag={zigzag} causal={causal} call {call}: {flag} {err:.2e}{note}", flush=True)
        del one, peers
dist.barrier()
dist.destroy_process_group()
