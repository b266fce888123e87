python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
PYTHONPATH=$PWD:/tmp/site timeout 120 python3 .gpu/probe_merge_time.py 2>&1 | grep -v Warn | tee $OUT/merge_time.log
RUN_LIMIT=420 timeout 460 bash .gpu/evidence.sh gpu-checks
