# Each GPU alone, then every GPU at once: the ring's backward block (probe_gpus_bwd.py); run from the tree root.
n=$(nvidia-smi -L | wc -l)
for g in $(seq 0 $((n - 1))); do CUDA_VISIBLE_DEVICES=$g python3 .gpu/probe_gpus_bwd.py "gpu$g alone" ${SECONDS_EACH:-5}; done
for g in $(seq 0 $((n - 1))); do CUDA_VISIBLE_DEVICES=$g python3 .gpu/probe_gpus_bwd.py "gpu$g together" ${SECONDS_EACH:-5} & done; wait
for g in $(seq 0 $((n - 1))); do CUDA_VISIBLE_DEVICES=$g python3 .gpu/probe_gpus_bwd.py "gpu$g alone again" ${SECONDS_EACH:-5}; done
