#!/usr/bin/env bash
# Record GPU-backend asv results for one commit on a GPU machine, in its existing python3 (nothing
# is built or downloaded). Results go to OUT/results/<machine>/ (gpu-h100 or gpu-h200 from
# nvidia-smi); copy that folder into asv_bench/results/ and commit it. Full log: OUT/gpu_run.log.
#
# Why it is shaped like this:
# - asv writes a run's results only when `asv run` exits, and loads (then merges into) the stored
#   results of the same machine/commit/environment first. So the work is split into many small
#   `asv run` steps, each under its own `timeout`: a step that overruns loses only itself, and what
#   the finished steps recorded accumulates in one results file. Steps go in priority order; after
#   TQ_ASV_DEADLINE seconds no new step starts, and the last one is cut at DEADLINE + GRACE.
# - asv runs every parameter combination in a fresh process. CuPy compiles a kernel module with
#   NVRTC on first use in a process unless ~/.cupy/kernel_cache holds it, so a warm-up first runs
#   every benchmarked op once per configuration (in parallel, one process per configuration):
#   afterwards each benchmark process only loads cubins. Numba has no disk cache for these kernels
#   (it JIT-compiles in every process), so numba_cuda is not warmed and is timed at mse-3.5 only.
# - This asv_runner re-runs `setup` before every timed sample (asv#966). TQ_ASV_REUSE_DATA=1 makes
#   the benchmarks reuse their drawn KV data within a process (benchmarks/common.py), so a sample
#   costs an upload and an encode instead of seconds of host RNG; warmup_time=0 drops asv's warm-up
#   loop (one more setup per sample; setup already runs the op once), rounds=1 keeps one process
#   per combination, repeat=3,10,1.0 takes 3 to 10 samples (about a second's worth), median stored.
#
# usage: asv_bench/gpu_run.sh OUT [COMMIT [REPO]]
#   COMMIT: the commit the results are recorded under (default: $COMMIT). REPO: a git repository
#   holding it (default: this checkout). Without git, or where REPO lacks COMMIT (the GPU machine's
#   copy has no .git), a stand-in `git` answers asv's few queries: COMMIT must then be a full
#   40-hex hash and COMMIT_TIME its author time (seconds since the epoch, `git log -1 --format=%at`).
# environment:
#   PYTHON            interpreter with asv, asv_runner and the backends (default python3)
#   TQ_ASV_MACHINE    machine name instead of gpu-h100/gpu-h200/gpu-other from nvidia-smi
#   TQ_ASV_BACKENDS   backends, in priority order (default "cupy_raw numba_cuda"). The first gets the
#                     whole head_dim 128 grid, the device-memory step and Quality at every config;
#                     the others time_* and Quality at mse-3.5
#   TQ_ASV_STEPS      regex on step names (time-<backend>-<op>, memory-<backend>, quality-<backend>)
#                     to run only some steps, e.g. a second call 'memory|quality'
#   TQ_ASV_WARMUP=0   skip the warm-up (it always runs otherwise: every cupy_raw step needs it)
#   TQ_ASV_DEADLINE   seconds after start past which no step starts (default 480)
#   TQ_ASV_GRACE      seconds past the deadline at which a running step is killed (default 45)
#   TQ_ASV_REPEAT     asv repeat for time_* (default 3,10,1.0: min samples, max samples, seconds)
#   TQ_ASV_NO_GIT=1   use the stand-in git even where git and COMMIT are available (to test it)
#   TQ_ASV_SMOKE=1    tiny data (benchmarks/common.py): CPU dry runs of this script
# Results already committed under asv_bench/results/<machine>/ are copied into OUT first, so a
# second call (e.g. TQ_ASV_STEPS='memory|quality') adds to them.
# CPU dry run (no GPU): TQ_ASV_MACHINE=cpu-dry TQ_ASV_BACKENDS="numpy numba_cuda" TQ_ASV_SMOKE=1
#   PYTHON=.venv/bin/python asv_bench/gpu_run.sh /tmp/out "$(git rev-parse HEAD)"
set -uo pipefail
ASV_DIR=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d'
  exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
commit=${2:-${COMMIT:-}}
repo=${3:-$(dirname "$ASV_DIR")}
PY=${PYTHON:-python3}
deadline=${TQ_ASV_DEADLINE:-480}
grace=${TQ_ASV_GRACE:-45}
read -r -a backends <<<"${TQ_ASV_BACKENDS:-cupy_raw numba_cuda}"
steps_re=${TQ_ASV_STEPS:-.}
t0=$SECONDS
exec > >(tee -a "$out/gpu_run.log") 2>&1 # the full log comes back with OUT
tee_pid=$!
die() {
  echo "gpu_run.sh: $*" >&2
  exit 2
}
[ -n "$commit" ] || die "no commit (second argument or \$COMMIT)"
"$PY" -c 'import asv, asv_runner' || die "$PY cannot import asv and asv_runner"
work=$(mktemp -d)
trap 'rm -rf "$work"; exec >&- 2>&-; wait "$tee_pid"' EXIT # log complete before OUT is read

# --- git: asv's --set-commit-hash asks git for the commit's hash and date (and a branch name).
if [ "${TQ_ASV_NO_GIT:-0}" != 1 ] && command -v git >/dev/null &&
  git -C "$repo" cat-file -e "$commit^{commit}" 2>/dev/null; then
  commit=$(git -C "$repo" rev-parse "$commit^{commit}")
else
  [[ $commit =~ ^[0-9a-f]{40}$ ]] || die "without git, COMMIT must be a full hash (got '$commit')"
  [[ ${COMMIT_TIME:-} =~ ^[0-9]+$ ]] || die "without git, set COMMIT_TIME (git log -1 --format=%at)"
  mkdir -p "$work/bin" "$work/repo/objects" # objects/: asv takes the folder for a bare repository
  cat >"$work/bin/git" <<SHEOF
#!/bin/sh
# Stand-in git for asv (gpu_run.sh): every name is $commit, dated $COMMIT_TIME, on branch main.
echo "\$*" >>"$out/stand-in-git.log" # which queries asv made
case " \$* " in
  *" rev-parse "*) echo $commit ;;
  *" rev-list "*) printf 'commit %s\\n%s\\n' $commit $COMMIT_TIME ;;
  *" name-rev "*) echo main ;;
  *) exit 1 ;;
esac
SHEOF
  chmod +x "$work/bin/git"
  export PATH=$work/bin:$PATH
  repo=$work/repo
  echo "== no git history here: stand-in git answers $commit (time $COMMIT_TIME)"
fi

# --- machine: named after the GPU; results/<machine>/ keeps GPU series apart from cpu-2core.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) || gpu=""
if [ -n "${TQ_ASV_MACHINE:-}" ]; then
  machine=$TQ_ASV_MACHINE
else
  case "$gpu" in
    *H200*) machine=gpu-h200 ;;
    *H100*) machine=gpu-h100 ;;
    "") die "no GPU visible to nvidia-smi; set TQ_ASV_MACHINE for a dry run" ;;
    *) machine=gpu-other ;;
  esac
fi
conf=$work/asv.conf.json
"$PY" - "$ASV_DIR" "$repo" "$out" "$work" "$conf" <<'PYEOF' || die "cannot write $conf"
import json, re, sys
asv_dir, repo, out, work, path = sys.argv[1:]
text = open(f"{asv_dir}/asv.conf.json").read()
conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
conf.update(repo=repo, benchmark_dir=f"{asv_dir}/benchmarks", results_dir=f"{out}/results",
            html_dir=f"{work}/html", env_dir=f"{work}/env")
json.dump(conf, open(path, "w"), indent=1)
PYEOF
if [ -d "$ASV_DIR/results/$machine" ] && [ ! -e "$out/results/$machine" ]; then
  mkdir -p "$out/results" && cp -r "$ASV_DIR/results/$machine" "$out/results/"
  echo "== seeded OUT with the committed results of $machine"
fi
# The machine entry in ~/.asv-machine.json, written whole: `asv machine` stores only the fields that
# differ from its own guesses, which leaves os/arch out of results/<machine>/machine.json.
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
"$PY" - "$machine" "${cpu:-unknown CPU} ($(nproc) CPUs)${gpu:+; $gpu}" "$(uname -sr)" "$(uname -m)" \
  "$(nproc)" "$(free -g 2>/dev/null | awk '/Mem:/{print $2}')GB" <<'PYEOF' || die "cannot write ~/.asv-machine.json"
import json, os, sys
path = os.path.expanduser("~/.asv-machine.json")
machines = json.load(open(path)) if os.path.exists(path) else {"version": 1}
keys = ("machine", "cpu", "os", "arch", "num_cpu", "ram")
machines[sys.argv[1]] = dict(zip(keys, sys.argv[1:]))
json.dump(machines, open(path, "w"), indent=4)
PYEOF
[ -n "${PYTHONPATH:-}" ] && export ASV_PYTHONPATH=$PYTHONPATH # asv drops PYTHONPATH otherwise
export TQ_ASV_REUSE_DATA=1
echo "== $machine (${gpu:-no GPU}), commit $commit, backends ${backends[*]}, deadline ${deadline}s"
"$PY" -c 'import importlib
for m in ("numpy", "cupy", "numba", "asv", "asv_runner"):
    try:
        print(f"   {m} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"   {m}: {type(e).__name__}")' 2>&1

summary=()
note() { # one line for the end-of-run summary
  summary+=("$(printf '%5ss  %-26s %s' "$((SECONDS - t0))" "$1" "$2")")
}
budget() { # seconds a step may take: its own limit, cut to what the deadline leaves
  local left=$((deadline + grace - (SECONDS - t0)))
  echo $(($1 < left ? $1 : left))
}
wanted() { # the step is selected (TQ_ASV_STEPS) and the deadline has not passed
  [[ $1 =~ $steps_re ]] || return 1
  if ((SECONDS - t0 >= deadline)); then
    note "$1" "skipped: deadline (${deadline}s) passed"
    return 1
  fi
}
configs() { # configuration regex for backend $1: the first backend every config, others mse-3.5
  if [ "$1" = "${backends[0]}" ]; then echo "'[^']+'"; else echo "'mse-3\\.5'"; fi
}

# --- warm-up: the benchmarks' own setup (encode + the op, float16 with a tail) and Quality (float32,
# no tail) on tiny data, so exactly the kernel modules the steps below use get compiled and cached.
cat >"$work/warmup.py" <<'PYEOF'
import sys, time
asv_dir, backend, config = sys.argv[1:]
sys.path.insert(0, asv_dir)  # asv_bench/benchmarks, not the repository's benchmarks/ scripts
t0 = time.time()
from benchmarks import bench_codec, bench_quality  # noqa: E402 (TQ_ASV_SMOKE=1: tiny data)
def done(what):
    print(f"   warm-up {backend} {config}: {what} ({time.time() - t0:.1f} s)", flush=True)
try:
    for cls in (bench_codec.Encode, bench_codec.Decode, bench_codec.Scores, bench_codec.Attention):
        cls().setup(backend, 128, config, 256)  # setup runs encode and the op once
        done(cls.op)
    q = bench_quality.Quality()
    q.setup(backend, 128, config)
    for name in ("track_mse", "track_inner_product_error", "track_attention_rel_error"):
        getattr(q, name)(backend, 128, config)
        done(name)
except NotImplementedError as exc:  # unavailable here: the steps record n/a
    done(f"skipped: {exc}")
PYEOF
if [ "${TQ_ASV_WARMUP:-1}" = 1 ]; then # whatever TQ_ASV_STEPS selects
  s=$SECONDS
  t=$(budget 240)
  echo "== [$((SECONDS - t0))s] warmup (timeout ${t}s)"
  pids=()
  for b in "${backends[@]}"; do
    [ "$b" = numba_cuda ] && continue # nothing on disk to warm (see header)
    for c in mse-2.5 mse-3.5 mse-4 prod-3.5; do # CONFIGS of benchmarks/common.py
      [[ "'$c'" =~ ^$(configs "$b")$ ]] || continue
      TQ_ASV_SMOKE=1 timeout -k 5 "$t" "$PY" "$work/warmup.py" "$ASV_DIR" "$b" "$c" &
      pids+=($!)
    done
  done
  failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
  note warmup "${#pids[@]} processes, $failed failed, $((SECONDS - s))s"
fi

# --- asv steps, in priority order.
step() { # step NAME MAX_SECONDS asv-run-arguments...
  local name=$1 max=$2 s=$SECONDS t rc
  shift 2
  wanted "$name" || return 0
  t=$(budget "$max")
  echo "== [$((SECONDS - t0))s] $name (timeout ${t}s): asv run $*"
  timeout -k 10 "$t" "$PY" -m asv run --config "$conf" --python=same --set-commit-hash "$commit" \
    --machine "$machine" --show-stderr --durations 3 "$@"
  rc=$?
  case $rc in
    0) note "$name" "ok, $((SECONDS - s))s" ;;
    2) note "$name" "saved, some benchmarks failed (see log), $((SECONDS - s))s" ;;
    124 | 137) note "$name" "TIMED OUT after $((SECONDS - s))s: nothing saved" ;;
    *) note "$name" "rc=$rc, $((SECONDS - s))s" ;;
  esac
}
time_attrs=(-a rounds=1 -a warmup_time=0 -a "repeat=${TQ_ASV_REPEAT:-3,10,1.0}")
for b in "${backends[@]}"; do
  for op in encode decode scores attention; do
    step "time-$b-$op" 150 -b "\\.${op^}\\.time_$op\\('$b', 128, $(configs "$b"), " "${time_attrs[@]}"
  done
done
b=${backends[0]}
step "memory-$b" 150 -b "DeviceMemory\\.track_peak_bytes\\('\\w+', '$b', 128, 'mse-3\\.5', "
for b in "${backends[@]}"; do
  step "quality-$b" 120 -b "Quality\\.track_\\w+\\('$b', 128, $(configs "$b")\\)"
done

# --- summary: the steps, then per benchmark how many values each backend has in the results file
# (asv stores skipped and not-selected combinations alike as n/a), and mse-3.5 medians.
{
  echo "== summary ($machine, commit ${commit:0:8}, $((SECONDS - t0))s)"
  printf '%s\n' "${summary[@]}"
  "$PY" - "$out/results/$machine" "${commit:0:8}" "${backends[@]}" <<'PYEOF'
import glob, itertools, json, math, sys
folder, prefix, *backends = sys.argv[1:]
for path in sorted(glob.glob(f"{folder}/{prefix}-*.json")):
    data = json.load(open(path))
    print(f"   {path.split('/')[-1]}: values per backend; time_* medians at mse-3.5 (ms)")
    for name, row in sorted(data["results"].items()):
        row = dict(zip(data["result_columns"], row))
        values = row["result"] if isinstance(row["result"], list) else [row["result"]]
        got = {b: 0 for b in backends}
        medians = []
        for combo, v in zip(itertools.product(*row["params"]), values):
            b = next((p.strip("'") for p in combo if p.strip("'") in got), None)
            if b is None or v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            got[b] += 1
            if name.split(".")[-1].startswith("time_") and "'mse-3.5'" in combo:
                medians.append(f"{b}/{combo[-1]}: {v * 1e3:.3g}")
        counts = ", ".join(f"{b} {n}" for b, n in got.items())
        print(f"     {name.split('.', 1)[1]:42s} {counts}")
        if medians:
            print(f"       {'; '.join(medians)}")
PYEOF
} | tee "$out/summary.txt"
