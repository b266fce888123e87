"""Each cell of a run against the GPUs' clocks, power and temperature that nvidia-smi logged beside
it: means over the cell's last 7 s (its timed samples), per GPU.

python cells.py RUN_FOLDER SMI_LOG.csv.gz
"""

import datetime as dt
import gzip
import json
import statistics as st
import sys

run, log = sys.argv[1:3]
rows = []
for line in gzip.open(log, "rt"):
    fields = [x.strip() for x in line.split(",")]
    when = dt.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f")
    rows.append((when, int(fields[1]), float(fields[2]), float(fields[4]), float(fields[6]), fields[7]))
for line in open(f"{run}/records.jsonl"):
    record = json.loads(line)
    end = dt.datetime.fromisoformat(record["started_at"]).replace(tzinfo=None) + dt.timedelta(seconds=record["duration_s"])
    label = f"{record['implementation']} {record['pass']} {'causal' if record['causal'] else 'non-causal'}"
    for gpu in (0, 1):
        timed = [r for r in rows if r[1] == gpu and end - dt.timedelta(seconds=7) <= r[0] <= end]
        print(
            f"{label:32s} median {record['stats']['median_ms']:8.2f} ms  GPU {gpu}: "
            f"SM clock {st.mean(r[2] for r in timed):5.0f} MHz ({min(r[2] for r in timed):.0f}-{max(r[2] for r in timed):.0f}), "
            f"{st.mean(r[3] for r in timed):4.0f} W, up to {max(r[4] for r in timed):.0f} C, "
            f"reasons {' '.join(sorted({r[5] for r in timed}))}"
        )
