#!/usr/bin/env bash
# One GPU, bf16, the Caltech-256 recipe. Extra arguments go to hnmix.train.
# The trainer is exec'd directly, not through `accelerate launch` (its single-process launcher
# SIGKILLs the trainer 5 s after a SIGTERM): SIGTERM or Ctrl-C reach the trainer, which finishes
# the step, saves however long that takes, and exits 75.
# For one process this is the same run as `accelerate launch --config_file accelerate_config.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m hnmix.train --mixed_precision bf16 --config configs/mochi_caltech256.yaml \
  --dir_out runs/caltech256 "$@"
