set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
for code in new head; do
  if [ $code = new ]; then export PYTHONPATH=$PWD:/tmp/site; else export PYTHONPATH=$PWD/.gpu/head:/tmp/site; fi
  for PARTS in "" 1; do export PARTS S=$([ -n "$PARTS" ] && echo 2048 || echo 16384); for rep in 1 2 3; do
    timeout 100 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_peer_copy.py > /tmp/pc.log 2>&1; echo "$code PARTS=$PARTS rep=$rep rc=$?"
    grep -v Warning /tmp/pc.log | grep "rel errors" | sed 's/ counted.*//' | grep -v "e-03 [0-9.]*e-03 [0-9.]*e-03 [0-9.]*e-03$" || echo "  every call of every rank within 1e-2"
  done; done
done
