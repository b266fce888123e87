set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
run() { local gpus=$1 port=$2; shift 2; env "$@" CUDA_VISIBLE_DEVICES=$gpus timeout 100 python3 -m torch.distributed.run --nproc-per-node=2 --master-port=$port .gpu/probe_ctas.py 2>&1 | grep "r0\]"; }
run 0,1 29500 X=1 & run 2,3 29600 NCCL_P2P_NVL_CHUNKSIZE=2097152 ; wait
run 0,1 29500 NCCL_P2P_NVL_CHUNKSIZE=8388608 & run 2,3 29600 NCCL_P2P_NVL_CHUNKSIZE=131072 ; wait
