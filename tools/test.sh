#!/usr/bin/env bash
# The test command: builds .venv from scratch if needed (CPU-only torch; Numba's CUDA simulator),
# then runs ruff, mypy and the whole pytest suite. Exits non-zero on any failure, and when pytest
# collected no test at all (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch first and pinned: this version is a local CPU wheel; anything looser pulls a CUDA build.
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[dev,numba,hf,asv]" "numba-cuda[cu13]"
# One BLAS thread: the 2-core CI machine runs small matrices, where threading only adds contention.
export NUMBA_ENABLE_CUDASIM=1 HF_HUB_OFFLINE=1 PYTHONHASHSEED=0 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
"$VPY" -m ruff check turboquant_codec integrations tests asv_bench benchmarks
"$VPY" -m mypy turboquant_codec
set +e
"$VPY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
