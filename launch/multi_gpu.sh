#!/usr/bin/env bash
# All GPUs of this machine (or NUM_GPUS of them), bf16. --batch_size is per GPU. Extra arguments go to hnmix.train.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}
exec accelerate launch --config_file accelerate_config.yaml --multi_gpu --num_processes "$NUM_GPUS" \
  -m hnmix.train --dataset ilee0022/Caltech-256 --dir_out runs/caltech256 "$@"
