"""Two GPUs: the calibration as a run makes it, three times, printed whole (contention, link points)."""
import json, os
from datetime import timedelta
import torch
from ringbench.run import calibrate
from ringbench.run.distributed import join

device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(device)
group = join(device, timedelta(minutes=5))
for attempt in range(3):
    measured = calibrate.measure(group)
    if group.is_leader:
        print(json.dumps({k: measured[k] for k in ("contention", "merge")}), flush=True)
        print("ring_step", [round(ms, 3) for ms in measured["ring_step"]["ms"]], flush=True)
        print("all_to_all", [round(ms, 3) for ms in measured["all_to_all"]["ms"]], flush=True)
group.leave()
