python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
timeout 400 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_gathered.py > $OUT/probe_gathered.txt 2>&1
echo rc=$?
grep -v Warning $OUT/probe_gathered.txt | tail -45
