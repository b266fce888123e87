set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
tar xzf .gpu/git.tgz && git checkout -q -- . && git log --oneline -1
probe() { local p=$1; shift; echo "== P=$p $*"; env "$@" timeout 45 python3 -m torch.distributed.run --nproc-per-node=$p results/evidence/probes/probe_peer_copy.py > /tmp/pc.log 2>&1; echo "rc=$?"; grep -v Warning /tmp/pc.log | grep "\[r0\] rings\|\[r0\] call\|rror" | head -8; }
probe 2 S=16384 | tee $OUT/probe.txt
probe 2 S=16384 SKEW=1 | tee -a $OUT/probe.txt
probe 4 S=2048 PARTS=1 | tee -a $OUT/probe.txt
grep -q "rc=0" $OUT/probe.txt && ! grep -q "rc=[1-9]" $OUT/probe.txt || exit 3
RUN_LIMIT=${RUN_LIMIT:-440} bash .gpu/evidence.sh x2-ring-transfers
