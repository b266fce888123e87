export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 PARTS= S=4096
for RINGS in 2 1; do export RINGS
  timeout 100 python3 -m torch.distributed.run --nproc-per-node=4 results/evidence/probes/probe_peer_copy.py > /tmp/pc.log 2>&1; echo "RINGS=$RINGS rc=$?"
  grep -v Warning /tmp/pc.log | grep "\[r[01]\]\|Error" | grep -v torch | head -8
done
