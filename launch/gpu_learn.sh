#!/usr/bin/env bash
# MoCo's own CIFAR-10 demo trained by hnmix on a GPU, beside the published curve, in one call
# for the minutes a GPU is lent (DEVELOPERS.md, "The GPU check").
#
#   launch/gpu_learn.sh [--dry-run] DATA_DIR [OUT_DIR] [--budget_s S] [--arms moco,mochi]
#
# DATA_DIR: CIFAR-10 laid out like the Hub's uoft-cs/cifar10 (a copy of ../shared/data/cifar10
# inside the checkout, e.g. .data/cifar10, carried with the device tool). Installs the wheels in
# .whl/, trains configs/moco_cifar10.yaml for about 7 minutes (--budget_s 480 in all), then
# configs/mochi_cifar10.yaml with the time left, the kNN after every epoch, and writes
# gpu_learn.json, gpu_learn.md and gpu_learn.log to OUT_DIR (default: $OUT). --dry-run: on the
# CPU at tiny sizes (CI runs it). The sections are tools/gpu_learn.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m tools.gpu_learn "$@"
