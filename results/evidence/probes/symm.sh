set -o pipefail
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit,temperature.gpu --format=csv
timeout 120 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_symm.py symm 2>&1 | grep -v Warning | tail -15
timeout 150 python3 .gpu/probe_symm.py split 2>&1 | tail -5
timeout 120 python3 .gpu/probe_symm.py drift 2>&1 | tail -40
