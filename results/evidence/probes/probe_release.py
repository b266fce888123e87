"""One GPU, 2 processes: do copy-engine buffers give their memory back when dropped, cell after cell?"""
import gc, os
os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
import torch, torch.distributed as dist
from ringbench.attention import peer_copy

dist.init_process_group("gloo")
rank = dist.get_rank()
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
for cell in range(6):
    buffers = peer_copy.PeerBuffers((2, 1, 16, 8192 * (cell + 1), 128), 2, torch.bfloat16, dev, dist.group.WORLD)
    send = torch.randn(buffers.slots[0].shape, device=dev, dtype=torch.bfloat16)
    arrivals = buffers.post(send, buffers.slots[cell % 2], (rank + 1) % 2, (rank - 1) % 2)
    for arrival in arrivals:
        arrival.wait()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated(dev) / 2**20
    del buffers, send, arrivals
    gc.collect()
    torch.cuda.synchronize()
    if os.environ.get("EMPTY"):
        torch.cuda.empty_cache()
    print(f"[r{rank}] cell {cell}: {allocated:.0f} MiB allocated with buffers; after: allocated "
          f"{torch.cuda.memory_allocated(dev) / 2**20:.0f} MiB, reserved {torch.cuda.memory_reserved(dev) / 2**20:.0f} MiB, "
          f"free on device {torch.cuda.mem_get_info(dev)[0] / 2**30:.2f} GiB", flush=True)
dist.barrier()
dist.destroy_process_group()
