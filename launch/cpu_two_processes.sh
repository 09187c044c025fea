#!/usr/bin/env bash
# Offline: 2 real CPU processes on the procedurally generated dataset (no network, no GPU).
# `accelerate launch --cpu --num_processes 2` would silently run ONE process; this runs two (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
ACCELERATE_USE_CPU=1 exec accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no -m hnmix.train \
  --dataset synthetic --dir_out runs/cpu-two-processes --arch resnet18 --img_size 64 --batch_size 32 \
  --k_moco 1024 --n_hard 32 --s1_hard 16 --s2_hard 16 --start1_hard 0 --start2_hard 0 \
  --steps 40 --steps_print 5 --steps_save 20 --num_workers 1 "$@"
