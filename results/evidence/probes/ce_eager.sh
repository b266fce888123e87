set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site PARTS= S=16384 EAGER=1
for rep in 1 2 3 4 5 6 7 8 9; do
  timeout 40 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_peer_copy.py > /tmp/pc.log 2>&1; echo "rep=$rep rc=$?"
  grep -v Warning /tmp/pc.log | grep " call 0 \|Traceback" | head -3
done
