set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
for round in 1 2; do for priority in 0 1; do
  TORCH_NCCL_HIGH_PRIORITY=$priority timeout 45 python3 -m torch.distributed.run --nproc-per-node=2 results/evidence/probes/probe_priority.py 2>&1 | grep "\[r\|Error\|error" | tee -a $OUT/probe_priority.txt
done; done
