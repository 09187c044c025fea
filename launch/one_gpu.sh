#!/usr/bin/env bash
# One GPU, bf16, Caltech-256 from the Hub. Extra arguments go to hnmix.train.
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file accelerate_config.yaml -m hnmix.train \
  --dataset ilee0022/Caltech-256 --dir_out runs/caltech256 "$@"
