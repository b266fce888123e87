export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
for EMPTY in "" 1; do export EMPTY; echo "EMPTY=$EMPTY"; timeout 100 python3 -m torch.distributed.run --nproc-per-node=2 results/evidence/probes/probe_release.py > /tmp/rel.log 2>&1; echo "rc=$?"
grep -v Warning /tmp/rel.log | grep "\[r0\]\|Error" | head -7; done
