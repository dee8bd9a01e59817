#!/usr/bin/env bash
# The test command: builds .venv if needed (tools/setup.sh), then runs ruff, mypy and the whole
# pytest suite with GPU backends under Numba's CUDA simulator. Exits non-zero on any failure, and
# when pytest collected no test at all (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
export NUMBA_ENABLE_CUDASIM=1 PYTHONHASHSEED=0
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
