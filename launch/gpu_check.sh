#!/usr/bin/env bash
# The GPU check: everything GPU-specific about hnmix measured in one call, for the minutes a GPU
# is lent (DEVELOPERS.md, "The GPU check").
#
#   launch/gpu_check.sh [OUT_DIR] [--dry-run] [--budget_s S] [--sections NAME,...]
#
# Installs the wheels in .whl/ (launch/fetch_gpu_wheels.sh) against requirements.txt, prints
# torch, CUDA, the card and the driver, runs the CUDA tests (tests/cuda) and the benchmarks at
# the paper's sizes (mixing, the trainer eager and compiled, the data pipeline; kernel launches,
# host and GPU time per step of the CIFAR and ImageNet recipes, with and without CUDA graphs),
# and writes gpu_check.json, gpu_check.log and gpu_check.md to OUT_DIR (default: $OUT), the table
# also on stdout. Under 8 minutes on an H100/H200 (--budget_s, default 450, bounds it; the last
# sections give way). --dry-run: every section on the CPU at tiny sizes, in about two minutes. A failing section is recorded and the next
# one runs; the exit code is 1 when any section failed. The sections are tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m tools.gpu_check "$@"
