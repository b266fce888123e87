set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv
CUDA_VISIBLE_DEVICES=0,1 timeout 400 python3 -m torch.distributed.run --nproc-per-node=2 results/evidence/probes/probe_profile.py 2>&1 | grep -v Warning | grep "r0\]\|Error\|error" | head -120
gzip $OUT/*.json
