#!/usr/bin/env bash
# Record GPU-backend results for one commit on a GPU machine, in its existing python3 (no env
# building, offline). Results go to OUT/results/<machine>/ (copy them into asv_bench/results/).
# A subset of the grid (head_dim 128; numba_cuda at mse-3.5 only, since Numba JIT-compiles its
# kernels again in every benchmark process). Each benchmark process pays CUDA start-up, kernel
# compilation/JIT and host-side data generation: on an H100 a 3-minute budget (steps of 70/40/20/25
# s) timed out in every step and saved nothing (asv writes a run's results only when it ends), so
# the steps below are sized for one ~10-minute call.
#
# usage: asv_bench/gpu_run.sh OUT COMMIT [REPO]
#   REPO: a git repository holding COMMIT (default: this checkout; a bare clone where the copy
#   on the GPU machine has no .git). PYTHON overrides python3. asv and asv_runner must import.
set -uo pipefail
ASV_DIR=$(cd "$(dirname "$0")" && pwd)
out=$1
commit=$2
repo=${3:-$(dirname "$ASV_DIR")}
PY=${PYTHON:-python3}
if ! command -v git >/dev/null; then
  # No git on the machine: answer the few queries `asv run --set-commit-hash` makes (COMMIT must
  # be a full hash; COMMIT_TIME its author time, seconds since the epoch).
  mkdir -p /tmp/asv-git-shim
  cat >/tmp/asv-git-shim/git <<SHEOF
#!/bin/sh
case " \$* " in
  *" rev-parse "*) echo $commit ;;
  *" rev-list "*) printf 'commit %s\\n%s\\n' $commit ${COMMIT_TIME:?} ;;
  *" name-rev "*) echo main ;;
  *) exit 1 ;;
esac
SHEOF
  chmod +x /tmp/asv-git-shim/git
  export PATH=/tmp/asv-git-shim:$PATH
fi
export ASV_PYTHONPATH=${PYTHONPATH:-}  # asv drops PYTHONPATH for benchmark processes otherwise
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) machine=gpu-h200 ;; *H100*) machine=gpu-h100 ;; *) machine=gpu-other ;; esac
conf=$out/asv.conf.json
"$PY" - "$ASV_DIR" "$repo" "$out" "$conf" <<'PYEOF'
import json, re, sys
asv_dir, repo, out, path = sys.argv[1:]
text = open(f"{asv_dir}/asv.conf.json").read()
conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
conf.update(repo=repo, benchmark_dir=f"{asv_dir}/benchmarks", results_dir=f"{out}/results",
            html_dir=f"{out}/html", env_dir=f"{out}/env")
json.dump(conf, open(path, "w"), indent=1)
PYEOF
"$PY" -m asv machine --config "$conf" --yes --machine "$machine" --arch "$(uname -m)" \
  --cpu "$(lscpu | sed -n 's/^Model name: *//p' | head -1); $gpu" --num_cpu "$(nproc)" \
  --os "$(uname -sr)" --ram "$(free -g | awk '/Mem:/{print $2}')GB"
run() {
  local t=$1
  shift
  timeout "$t" "$PY" -m asv run --config "$conf" --python=same --set-commit-hash "$commit" \
    --machine "$machine" --show-stderr "$@"
  echo "== rc=$? for: $*"
}
run 240 -b "time_\w+\('cupy_raw', 128"
run 150 -b "time_\w+\('numba_cuda', 128, 'mse-3.5'"
run 60 -b "track_peak_bytes\('\w+', 'cupy_raw', 128, 'mse-3.5'"
run 90 -b "Quality.track_\w+\('(cupy_raw|numba_cuda)', 128, 'mse-3.5'"
