set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
rm -rf .git && tar xzf .gpu/git.tgz && git checkout -q -- . && git status --short | head
rm -rf /tmp/old && git worktree add -q /tmp/old a38876a
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv
git log --oneline -1
echo "== probe, before (a38876a)"; PYTHONPATH=/tmp/old:$PYTHONPATH timeout 150 python3 .gpu/probe_ring1.py 2>&1 | grep -v "Warning\|warn_once\|kernels:"
echo "== probe, after"; PYTHONPATH=$PWD:$PYTHONPATH timeout 150 python3 .gpu/probe_ring1.py 2>&1 | grep -v "Warning\|warn_once\|kernels:"
export PYTHONPATH=$PWD:$PYTHONPATH
R=$OUT/runs && mkdir -p $R
timeout 330 python3 -m ringbench run configs/ring-one-device.yaml --output-root $R 2>&1 | grep -v "│" | tail -5
for run in $R/2*; do python3 -m ringbench report $run --quiet --no-plots; done
