set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv
python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version())"
run() { local gpus=$1 port=$2; shift 2; env "$@" CUDA_VISIBLE_DEVICES=$gpus timeout 150 python3 -m torch.distributed.run --nproc-per-node=$(( (${#gpus}+1)/2 )) --master-port=$port .gpu/probe_ctas.py 2>&1 | grep -v Warning; }
run 0,1 29500 SDPA_HEADS=1 & run 2,3 29600 NCCL_MAX_CTAS=4 ; wait
run 0,1 29500 NCCL_MAX_CTAS=2 & run 2,3 29600 NCCL_MAX_CTAS=8 ; wait
run 0,1,2,3 29500 X=1
run 0,1,2,3 29500 NCCL_MAX_CTAS=4
