# Each GPU alone, then every GPU at once: the same sustained cuDNN loop (probe_gpus.py).
n=$(nvidia-smi -L | wc -l)
for g in $(seq 0 $((n - 1))); do CUDA_VISIBLE_DEVICES=$g python3 /tmp/probe_gpus.py "gpu$g alone" ${SECONDS_EACH:-6}; done
for g in $(seq 0 $((n - 1))); do CUDA_VISIBLE_DEVICES=$g python3 /tmp/probe_gpus.py "gpu$g together" ${SECONDS_EACH:-6} & done; wait
for g in $(seq 0 $((n - 1))); do CUDA_VISIBLE_DEVICES=$g python3 /tmp/probe_gpus.py "gpu$g alone again" ${SECONDS_EACH:-6}; done
