#!/usr/bin/env bash
# All GPUs of this machine (or NUM_GPUS of them), bf16, the Caltech-256 recipe. --batch_size is
# per GPU. Extra arguments go to hnmix.train; DIR_OUT (default runs/caltech256) is where the run goes.
# SIGTERM or Ctrl-C: every rank saves and the script exits 75; a bad option is one line and exit 2
# (see launch/stop_aware.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/stop_aware.sh
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}
DIR_OUT=${DIR_OUT:-runs/caltech256}
options=(--config configs/mochi_caltech256.yaml --dir_out "$DIR_OUT" "$@")
check_options "$NUM_GPUS" "${options[@]}"
run_stop_aware "$DIR_OUT" accelerate launch --config_file accelerate_config.yaml --multi_gpu --num_processes "$NUM_GPUS" \
  -m hnmix.train "${options[@]}"
