#!/usr/bin/env bash
# The speed issue's GPU benchmark, in one table (under 6 minutes on an H100): the trainer against
# its ceiling for resnet50, 224 px, bf16, batch 256, K=65536, n_hard=1024, s1=1024, s2=512, on
# generated JPEGs with all the host's cores. Record the table in BENCHMARKS.md with card and date.
# Needs hnmix's requirements (`pip install -r requirements.txt`: datasets and simplejpeg too).
# Extra hnmix.train options pass through, e.g. `launch/bench_gpu.sh --compile`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
python -m hnmix.bench train --warmup_steps 5 --measure_steps 20 --images 2048 --json "$OUT/bench_gpu.json" \
  -a resnet50 -i 224 -bs 256 -km 65536 -nh 1024 -s1h 1024 -s2h 512 -st1h 0 -st2h 0 \
  --mixed_precision bf16 --num_workers "$(nproc)" "$@"
