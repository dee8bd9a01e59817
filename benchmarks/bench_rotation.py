"""Host encode/decode throughput by rotation kind and path: Haar (dense), Hadamard2 dense, and
Hadamard2 by sign flips + fast Walsh-Hadamard transforms (NumPy butterflies, Numba compiled).

The NumPy reference serves encode and decode on the host (numba_cpu serves only the paged decode
step), so its rotation path (``tuning.HostTuning.rotation_path``) is what changes the host's codec
speed. For each case: the rotation alone (all groups of one config, forward) and the whole
``numpy_ref.encode`` / ``numpy_ref.decode`` of ``n`` vectors, median of ``--repeats`` timings of one
call each (after a warm-up call, so Numba's compile is not counted). Single-threaded: set
``OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1`` (the script refuses to run without them unless
``--any-threads``).

Also the numba_cpu paged decode step (one token, SmolLM2's layer shape: 3 KV heads x 3 query heads,
d=64, 2k context), whose query rotation and value un-rotation take the fast path for Hadamard kinds.

Usage: OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_rotation.py [--d 128]
       [--n 4096] [--repeats 21] [--out benchmarks/RESULTS-rotation.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import turboquant_codec as tq
from turboquant_codec import CodecConfig, tuning
from turboquant_codec.backends import numpy_ref
from turboquant_codec.transforms import rotate, tables
from turboquant_codec.tuning import HostTuning

CASES = (("haar", "dense"), ("hadamard2", "dense"), ("hadamard2", "numpy"), ("hadamard2", "numba"))


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_ms(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median ms of each ``fn``, timed round-robin so that load from other jobs on a shared machine
    falls on every case alike. Each timed call follows an untimed call of the same ``fn``: the case
    before it (the NumPy path's large temporaries) otherwise leaves it fresh pages and a cold cache,
    adding ~4-6 ms to whichever case comes next, which a loop of one case does not see."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            fn()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


def _under(path: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with tuning.using(host=HostTuning(rotation_path=path)):
            return fn()

    return run


def codec_rows(d: int, n: int, bits: float, repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    rot, enc, dec = [], [], []
    for kind, path in CASES:
        cfg = CodecConfig(d, bits, "mse", seed=1, rotation=kind)
        parts = [rng.standard_normal((n, g.dim)) for g in cfg.groups]
        records, channels = numpy_ref.encode(x, cfg, None)
        encoded = tq.Encoded(records, channels, cfg)
        rot.append(_under(path, lambda p=parts, c=cfg: [rotate(a, t)
                                                        for a, t in zip(p, tables(c), strict=True)]))
        enc.append(_under(path, lambda c=cfg: numpy_ref.encode(x, c, None)))
        dec.append(_under(path, lambda e=encoded: numpy_ref.decode(e)))
    times = [interleaved_ms(fns, repeats) for fns in (rot, enc, dec)]
    groups = "+".join(str(g.dim) for g in CodecConfig(d, bits, "mse").groups)
    rows = []
    for i, (kind, path) in enumerate(CASES):
        r, e, de = (t[i] for t in times)
        rows.append(f"| {bits:g} ({groups}) | {kind} | {path} | {r:.2f} | {e:.2f} | {n / e / 1e3:.3f} | "
                    f"{de:.2f} | {n / de / 1e3:.3f} |")
    return rows


def paged_rows(repeats: int) -> list[str]:
    if not tq.backends.availability("numba_cpu"):
        return [f"numba_cpu unavailable: {tq.backends.availability('numba_cpu').reason}"]
    from turboquant_codec.backends import numba_cpu

    h_kv, group, d, block, ctx = 3, 3, 64, 16, 2048
    steps, kinds = [], ("haar", "hadamard2")
    for kind in kinds:
        rng = np.random.default_rng(1)
        k_cfg, v_cfg = CodecConfig(d, 3.5, "mse", 2, kind), CodecConfig(d, 3.5, "mse", 3, kind)
        blocks = ctx // block + 1
        cache = tq.PagedCache(np.zeros((blocks, block, h_kv, k_cfg.record_bytes), np.uint8),
                              np.zeros((blocks, block, h_kv, v_cfg.record_bytes), np.uint8), k_cfg, v_cfg)
        kv = rng.standard_normal((ctx, h_kv, d)).astype(np.float32)
        cache = tq.paged_write(cache, kv, kv[::-1].copy(), np.arange(ctx))
        dec = numba_cpu.paged_decoder(cache, np.arange(blocks, dtype=np.int32)[None])
        q = rng.standard_normal((1, h_kv * group, d)).astype(np.float32)
        kn = rng.standard_normal((1, h_kv, d)).astype(np.float32)
        out = np.zeros((1, h_kv * group, d), np.float32)
        seq = np.array([ctx + 1], np.int32)
        steps.append(lambda dec=dec, q=q, kn=kn, out=out, seq=seq: dec(q, kn, kn, seq, 0.125, out))
    times = interleaved_ms(steps, repeats)
    return [f"| {kind} | {ms * 1e3:.0f} |" for kind, ms in zip(kinds, times, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.5])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--any-threads", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    threads = (os.environ.get("OPENBLAS_NUM_THREADS"), os.environ.get("NUMBA_NUM_THREADS"))
    if threads != ("1", "1") and not args.any_threads:
        ap.error("set OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 (or pass --any-threads)")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    lines = ["# Host rotation paths: encode/decode throughput by rotation kind",
             "",
             f"`{' '.join(['python benchmarks/bench_rotation.py', *os.sys.argv[1:]])}` on {platform.node()} "
             f"({cpu}, {os.cpu_count()} cores shared with other jobs; 1 BLAS and 1 Numba thread), "
             f"NumPy {np.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "",
             f"NumPy reference codec, d={args.d}, n={args.n} float32 vectors per call, mse mode; medians of "
             f"{args.repeats} calls (ms), the four cases timed round-robin. `rotate`: the forward rotation "
             "of every group alone (float64); Mvec/s: million vectors per second.",
             "",
             "| bits (groups) | rotation | path | rotate ms | encode ms | encode Mvec/s | decode ms | "
             "decode Mvec/s |",
             "|---|---|---|---|---|---|---|---|"]
    for bits in args.bits:
        lines += codec_rows(args.d, args.n, bits, args.repeats)
    lines += ["", "numba_cpu paged decode step, one token, 3 KV x 3 query heads, d=64, 3.5-bit mse K/V, "
              "2048-token context, median us of the repeats, interleaved:", "",
              "| rotation | step us |", "|---|---|"]
    lines += paged_rows(args.repeats * 5)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
