set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site S=16384
python3 -c "import triton, os; print(os.path.dirname(triton.__file__))"
grep -rn "pdl\|Programmatic" $(python3 -c "import triton, os; print(os.path.dirname(triton.__file__))")/backends/nvidia/driver.py | head -20
timeout 120 python3 .gpu/probe_merge_stream.py 2>&1 | grep -v Warn | tee $OUT/merge_stream.log
run() {  # label, then env settings
  label=$1; shift
  env "$@" timeout 60 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_ce_trace.py > /tmp/t.log 2>&1; rc=$?
  echo "== $label rc=$rc wrong=$(grep -c WRONG /tmp/t.log)" | tee -a $OUT/trace.log
  grep "WRONG\|Error\|error:" /tmp/t.log | grep -v Warning | head -6
  grep "^\[r" /tmp/t.log >> $OUT/trace.log
}
for rep in 1 2 3 4; do
  run trace-$rep TRIALS=3 TRACE=1
  run syncmerge-$rep TRIALS=3 SYNCMERGE=1
done
