#!/usr/bin/env bash
# Download into .whl/ the wheels that the GPU machine lacks, for its Python 3.12 on manylinux
# x86-64, so that launch/gpu_check.sh can install them there offline (the device tool carries
# .whl/ with `carry: [".whl"]`; it is gitignored). Run it here, where PyPI answers.
#
#   launch/fetch_gpu_wheels.sh [NAME==VERSION ...]
#
# The GPU machine has torch, torchvision, timm, accelerate, safetensors, rich, huggingface_hub,
# pyarrow, pillow, pytest and what `datasets` needs besides (pandas, xxhash, fsspec, ...), but
# not `datasets`, `dill`, `multiprocess` or `simplejpeg`, and perhaps an accelerate older than
# requirements.txt's floor (1.16): exactly those five are fetched, at the versions installed here
# (where hnmix's tests pass), without their dependencies. Extra names
# (e.g. one that the check's set-up reports as too old there) are fetched too. .whl/ is emptied
# first: the install there takes every wheel, and two versions of one package stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
names=(datasets dill multiprocess simplejpeg accelerate "$@")
specs=()
for name in "${names[@]}"; do
  if [[ $name == *[=\<\>]* ]]; then specs+=("$name"); continue; fi
  version=$("$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)
  specs+=("$name${version:+==$version}")
done
rm -rf .whl
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl "${specs[@]}"
ls -l .whl/*.whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, $((total / 1024)) KiB in .whl/ (the device tool carries at most 64 MiB)"
if (( total > 50 * 1024 * 1024 )); then
  echo "fetch_gpu_wheels: error: .whl/ holds over 50 MB; carry fewer wheels" >&2
  exit 1
fi
