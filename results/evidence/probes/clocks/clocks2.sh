# bash .gpu/clocks2.sh NAME: the run of configs/NAME.yaml with nvidia-smi logging the GPUs beside it.
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active --format=csv,noheader,nounits -lms 100 > $OUT/smi.csv &
SMI=$!
bash .gpu/evidence.sh "$@"
kill $SMI
gzip $OUT/smi.csv
