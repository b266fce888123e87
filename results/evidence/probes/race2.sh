set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
for shape in "H=16 S=8192 D=128" "H=16 S=65536 D=128 TRIALS=40" "H=4 S=8192 D=32"; do
  echo "== $shape" | tee -a $OUT/race2.log
  env $shape MERGE_ONLY=1 timeout 200 python3 .gpu/probe_race.py 2>&1 | grep -v Warn | tee -a $OUT/race2.log
done
for rep in 1 2 3 4 5 6 7 8; do
  PARTS= S=16384 timeout 60 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_peer_copy.py > /tmp/pc.log 2>&1; echo "ce rep=$rep rc=$?" | tee -a $OUT/race2.log
  grep -v Warning /tmp/pc.log | grep "errors [0-9]\|Traceback" | head -4 | tee -a $OUT/race2.log
done
