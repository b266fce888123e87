set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site S=16384
for rep in 1 2 3 4 5 6; do
  timeout 60 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_ce_merge.py > /tmp/t.log 2>&1; rc=$?
  echo "== rep $rep rc=$rc" | tee -a $OUT/merge.log
  grep "^\[r\|Error" /tmp/t.log | tee -a $OUT/merge.log | head -8
done
