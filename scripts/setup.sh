#!/usr/bin/env bash
# Set up locality in ./.venv: torch, the package with its test extras, and (as root, on Debian)
# the Fashion-MNIST package that makes the default run work offline. Idempotent.
#   bash scripts/setup.sh            # then: .venv/bin/python -m locality.run
# Environment: PYTHON (interpreter for the venv, default python3),
#              LOCALITY_TORCH (pip requirement for torch, default the pinned pair below).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LOCALITY_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_SPEC
fi
echo "[setup] installing locality (editable) with its test extras"
.venv/bin/python -m pip install -q -e '.[test]'

# Debian packages (as root): the offline default dataset, and a C compiler for the fused
# softmax that locality builds on first use (without one the slower torch softmax runs)
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
packages=()
[ -f "$fmnist" ] || packages+=(dataset-fashion-mnist)
command -v "${CC:-cc}" >/dev/null || command -v gcc >/dev/null || packages+=(gcc libc6-dev)
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's ${packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
  else
    echo "[setup] note: missing ${packages[*]}: install them (Debian names), or run with dataset.download=true"
    echo "        for the data; without a C compiler the torch softmax runs (slower)"
  fi
fi
echo "[setup] done: .venv/bin/python -m locality.run --help"
