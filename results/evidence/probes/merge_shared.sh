set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
go() { n=$1; shift; echo "== nproc=$n $*" | tee -a $OUT/shared.log; env "$@" timeout 150 python3 -m torch.distributed.run --nproc-per-node=$n .gpu/probe_merge_shared.py 2>&1 | grep "^\[r\|Error" | tee -a $OUT/shared.log; }
go 1 TRIALS=300
go 2 TRIALS=300
go 2 TRIALS=300 BUSY=1 SECONDS_BUSY=40
go 2 TRIALS=300 MERGE=eager
