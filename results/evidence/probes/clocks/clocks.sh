# bash .gpu/clocks.sh NAME: the run of configs/NAME.yaml with the GPUs' clocks, power and temperature
# logged every 100 ms, then a hot-GPU rate probe.
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active --format=csv,noheader,nounits -lms 100 > $OUT/smi.csv &
SMI=$!
date -u
bash .gpu/evidence.sh "$@"
date -u
python3 .gpu/hot_sdpa.py 2>&1 | grep -v Warning | tee $OUT/hot.txt
date -u
kill $SMI
gzip $OUT/smi.csv
