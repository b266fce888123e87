set -o pipefail
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv
timeout 300 python3 .gpu/probe_merge.py 2>&1 | grep -v "Warning\|warn_once"
