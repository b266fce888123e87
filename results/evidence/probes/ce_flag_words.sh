set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
tar xzf .gpu/git.tgz && git checkout -q -- . && git log --oneline -1
probe() { local p=$1; shift; echo "== P=$p $*"; env "$@" timeout 60 python3 -m torch.distributed.run --nproc-per-node=$p results/evidence/probes/probe_peer_copy.py > /tmp/pc.log 2>&1; echo "rc=$?"; grep -v Warning /tmp/pc.log | grep "\[r0\] rings\|\[r0\] call\|rror" | head -8; }
probe 4 S=4096 | tee $OUT/probe.txt
