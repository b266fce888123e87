set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
for PARTS in "" 1; do export PARTS S=$([ -n "$PARTS" ] && echo 2048 || echo 16384); for rep in 1 2 3 4 5 6; do
  timeout 100 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_peer_copy.py > /tmp/pc.log 2>&1; echo "PARTS=$PARTS rep=$rep rc=$?"
  grep -v Warning /tmp/pc.log | grep "rel errors" | sed 's/ counted.*//' | grep -v "e-03 [0-9.]*e-03 [0-9.]*e-03 [0-9.]*e-03$" || echo "  every call of every rank within 1e-2"
done; done
export PARTS=1 S=2048
timeout 100 python3 -m torch.distributed.run --nproc-per-node=4 .gpu/probe_peer_copy.py > /tmp/pc.log 2>&1; echo "PARTS=1 P=4 rc=$?"
grep -v Warning /tmp/pc.log | grep "rel errors" | sort
bash .gpu/rings.sh
