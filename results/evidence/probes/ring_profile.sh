set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv
N=$(nvidia-smi -L | wc -l)
timeout 190 python3 -m torch.distributed.run --nproc-per-node=$N .gpu/probe_ring_profile.py 2>&1 | grep -v Warning | grep "r0\]\|Error\|error" | head -150
gzip $OUT/*.json
