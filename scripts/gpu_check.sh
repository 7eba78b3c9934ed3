#!/usr/bin/env bash
# The GPU checks, from the repository root on a CUDA machine: the Fashion-MNIST benchmark, the
# CUDA tests (pytest -m cuda) and the proxy benchmarks (scripts/gpu_check.py; its --probe, the
# bf16x6 precision probe, runs with PROBE=1); logs and JSON go to $OUT (default outputs/gpu_check).
# Optional inputs beside the checkout, for a machine
# without network or Hydra: .whl/ (wheels of hydra-core, omegaconf, antlr4 to install),
# .devdata/fashion-mnist (the IDX files) and .devdata/reference (../shared/reference).
set -o pipefail
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -d .devdata/reference ] && export LOCALITY_REFERENCE_DIR=$PWD/.devdata/reference
if [ -d .devdata/fashion-mnist ] && [ ! -e /usr/share/datasets/fashion-mnist ]; then
    mkdir -p /usr/share/datasets && cp -r .devdata/fashion-mnist /usr/share/datasets/
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[ "${PROBE:-0}" = 1 ] && python3 scripts/gpu_check.py "$OUT" --probe 2>&1 | tee "$OUT/probe.log"
python3 scripts/gpu_check.py "$OUT" --fmnist 2>&1 | tee "$OUT/bench_fmnist.log"
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log"
python3 scripts/gpu_check.py "$OUT" --large 2>&1 | tee "$OUT/bench_large.log"
