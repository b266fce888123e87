export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 120 python3 -m torch.distributed.run --nproc-per-node=2 .gpu/probe_symm.py symm > /tmp/symm.log 2>&1
grep -v Warning /tmp/symm.log | grep -i "error\|symm r\|exception\|raise\|not supported\|RuntimeError" | head -20
