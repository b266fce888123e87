set -o pipefail
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/channels.txt
run() { env "$@" NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT CUDA_VISIBLE_DEVICES=0,1 timeout 100 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_channels.py 2>&1 | grep -a "r0\]\|Channel 00\|nChannels\|Error" | grep -v "Warning" | sort -u | head -8 | tee -a $OUT/channels.txt; }
run TAG=default
run TAG=min32p2p32 NCCL_MIN_NCHANNELS=32 NCCL_MIN_P2P_NCHANNELS=32
run TAG=cememcpy NCCL_P2P_USE_CUDA_MEMCPY=1
run TAG=min64p2p64 NCCL_MIN_NCHANNELS=64 NCCL_MIN_P2P_NCHANNELS=64
