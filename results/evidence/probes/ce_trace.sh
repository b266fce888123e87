set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site S=16384
run() {  # label, then env settings
  label=$1; shift
  env "$@" timeout 60 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_ce_trace.py > /tmp/t.log 2>&1; rc=$?
  echo "== $label rc=$rc wrong=$(grep -c WRONG /tmp/t.log)"
  grep "WRONG\|Error\|error:" /tmp/t.log | grep -v Warning | head -6
  cp /tmp/t.log $OUT/$label.log
}
for rep in 1 2 3 4 5; do
  run plain-$rep TRIALS=3
  run trace-$rep TRIALS=3 TRACE=1
  run eager-$rep TRIALS=3 EAGER=1
done
