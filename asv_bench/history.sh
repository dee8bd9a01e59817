#!/usr/bin/env bash
# Record asv results for past commits with an existing Python environment: nothing is built or
# downloaded, so it works offline. Each commit's source is exported with `git archive` into a
# temporary folder that goes first on the benchmarks' PYTHONPATH (asv passes ASV_PYTHONPATH on),
# and the results are stored under that commit with --set-commit-hash. The benchmarks themselves
# are this checkout's asv_bench/benchmarks (asv's usual behaviour), so one suite measures all
# commits. The environment must hold the commits' dependencies (numpy, ml_dtypes; asv).
#
# usage: asv_bench/history.sh MACHINE COMMIT... [-- extra asv run arguments]
#   MACHINE: a name known to `asv machine` (e.g. cpu-2core); PYTHON=path overrides .venv/bin/python
set -euo pipefail
ASV_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$ASV_DIR")
PY=${PYTHON:-$ROOT/.venv/bin/python}
machine=$1
shift
commits=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do commits+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for c in "${commits[@]}"; do
  hash=$(git -C "$ROOT" rev-parse --verify "$c^{commit}")
  src="$tmp/$hash"
  mkdir -p "$src"
  git -C "$ROOT" archive "$hash" | tar -x -C "$src"
  export ASV_PYTHONPATH="$src:$src/integrations"
  # Refuse to record results for the wrong source tree.
  got=$(cd "$tmp" && PYTHONPATH="$ASV_PYTHONPATH" "$PY" -c 'import turboquant_codec as t; print(t.__file__)')
  case "$got" in "$src"/*) ;; *) echo "imported $got, not $src" >&2; exit 1 ;; esac
  echo "== $(git -C "$ROOT" log -1 --format='%h %s' "$hash" | cut -c1-90)"
  (cd "$ASV_DIR" && "$PY" -m asv run --python=same --set-commit-hash "$hash" --machine "$machine" "$@")
  rm -rf "$src"
done
