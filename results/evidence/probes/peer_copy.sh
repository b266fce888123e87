export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for PARTS in "" 1; do export PARTS S=$([ -n "$PARTS" ] && echo 2048 || echo 16384); for P in 2 4; do
  timeout 100 python3 -m torch.distributed.run --nproc-per-node=$P results/evidence/probes/probe_peer_copy.py > /tmp/pc$P.log 2>&1; echo "PARTS=$PARTS P=$P rc=$?"
  grep -v Warning /tmp/pc$P.log | grep "\[r0\]\|Error\|error" | head -12
done; done
