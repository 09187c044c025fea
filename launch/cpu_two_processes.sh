#!/usr/bin/env bash
# Offline: 2 real CPU processes on the procedurally generated dataset (no network, no GPU).
# `accelerate launch --cpu --num_processes 2` would silently run ONE process; this runs two (gloo).
# SIGTERM or Ctrl-C: both ranks save and the script exits 75; a bad option is one line and exit 2
# (see launch/stop_aware.sh).
# DIR_OUT (default runs/cpu-two-processes) is where the run goes.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/stop_aware.sh
DIR_OUT=${DIR_OUT:-runs/cpu-two-processes}
export ACCELERATE_USE_CPU=1
options=(--dataset synthetic --dir_out "$DIR_OUT" --arch resnet18 --img_size 64 --batch_size 32
  --k_moco 1024 --n_hard 32 --s1_hard 16 --s2_hard 16 --start1_hard 0 --start2_hard 0
  --steps 40 --steps_print 5 --steps_save 20 --num_workers 1 "$@")
check_options 2 "${options[@]}"
run_stop_aware "$DIR_OUT" accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no -m hnmix.train "${options[@]}"
