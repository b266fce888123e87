set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
tar xzf .gpu/git.tgz && git checkout -q -- . && git log --oneline -1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv
for p in $PRIORITIES; do
  mkdir -p /tmp/runs/p$p
  TORCH_NCCL_HIGH_PRIORITY=$p timeout 280 python3 -m ringbench run results/evidence/probes/priority/x2-priority.yaml --output-root /tmp/runs/p$p 2>&1 | grep -v Warning | tail -14 | tee "$OUT/p$p.log"
  run=$(ls -d /tmp/runs/p$p/*/ | tail -1)
  tar czf "$OUT/p$p.tgz" -C "$(dirname "$run")" "$(basename "$run")"
done
