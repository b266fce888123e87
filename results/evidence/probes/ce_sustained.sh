set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
timeout 240 python3 -m torch.distributed.run --nproc-per-node=2 results/evidence/probes/probe_ce_sustained.py 2>&1 | grep -v Warning | grep "\[r\|Error\|error" | tee $OUT/probe_ce_sustained.txt
gzip $OUT/*.json
