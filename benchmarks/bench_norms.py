"""Accuracy of the stored norms: tiny and huge magnitudes, and the codec's error at unit scale.

NumPy reference backend, CPU only (the norm's storage format is the same bytes on every backend).

1. **Scale sweep**: unit vectors (d=128, float32 input) times s for s from 1e-20 to 1e30, mode mse:
   relative decode error ``|x_hat - x|^2 / |x|^2`` (mean over vectors). A working norm format gives
   the same figure at every scale; "refused" where encode raises (a norm out of the format's range).
2. **Codec error at unit scale**, bits 2.5 / 3.5 / 4, mse and prod: relative MSE of decode, and the
   inner-product error ``(score - <q, k>)^2 / (|q|^2 |k|^2 / d)`` (mean, and the bias
   ``mean(score - <q, k>) / mean |<q, k>|``), on unit vectors and on ``testing.kv_like`` data, over
   ``--seeds`` seeds; the figure is the mean over seeds with its standard error, so two versions of
   the library compare within noise (the same seeds give the same codes in every version: only the
   stored norms differ, so the difference between versions is the norm format's own).

Works on any version of the library (run it from a checkout of each).

Usage: python benchmarks/bench_norms.py [--n 2048] [--seeds 4] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import turboquant_codec as tq
from turboquant_codec.testing import kv_like, unit_vectors

D = 128
SCALES = (1e-30, 1e-20, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1.0, 1e4, 6e4, 1e5, 1e6, 1e30, 1e37)
BITS = (2.5, 3.5, 4.0)


def rel_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    err = np.sum((x_hat.astype(np.float64) - x64) ** 2, axis=-1) / np.sum(x64**2, axis=-1)
    return float(np.mean(err))


def scale_sweep(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    x = unit_vectors(rng, (1, n, D))
    lines = ["| scale | " + " | ".join(f"{b:g} bits" for b in BITS) + " |",
             "|---" * (len(BITS) + 1) + "|"]
    for s in SCALES:
        cells = []
        for b in BITS:
            xs = (x * s).astype(np.float32)
            try:
                enc = tq.encode(xs, bits=b, backend="numpy")
            except ValueError:
                cells.append("refused")
                continue
            cells.append(f"{rel_mse(xs, tq.decode(enc)):.5f}")
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return lines


def codec_error(data: str, b: float, mode: str, n: int, seed: int) -> tuple[float, float, float]:
    """(relative MSE, normalised inner-product MSE, relative bias) of one seed."""
    rng = np.random.default_rng(100 + seed)
    if data == "unit":
        k = unit_vectors(rng, (1, n, D)).astype(np.float32)
    else:
        k = kv_like(rng, (1, n, D))
    q = rng.standard_normal((1, 16, D)).astype(np.float32)
    enc = tq.encode(k, bits=b, mode=mode, seed=seed, backend="numpy")
    mse = rel_mse(k, tq.decode(enc))
    true = np.einsum("...md,...nd->...mn", q.astype(np.float64), k.astype(np.float64))
    got = tq.scores(q, enc, backend="numpy").astype(np.float64)
    unit = (np.sum(q.astype(np.float64) ** 2, -1)[..., :, None]
            * np.sum(k.astype(np.float64) ** 2, -1)[..., None, :] / D)
    ip = float(np.mean((got - true) ** 2 / unit))
    bias = float(np.mean(got - true) / np.mean(np.abs(true)))
    return mse, ip, bias


def error_table(n: int, seeds: int) -> list[str]:
    lines = ["| data | mode | bits | rel. MSE | IP error | IP bias |", "|---|---|---|---|---|---|"]
    for data in ("unit", "kv_like"):
        for mode in ("mse", "prod"):
            for b in BITS:
                runs = np.array([codec_error(data, b, mode, n, s) for s in range(seeds)])
                mean = runs.mean(0)
                se = runs.std(0, ddof=1) / np.sqrt(seeds) if seeds > 1 else np.zeros(3)
                cells = [f"{m:.6f} +- {e:.6f}" for m, e in zip(mean, se, strict=True)]
                lines.append(f"| {data} | {mode} | {b:g} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out")
    args = ap.parse_args()
    fmt = getattr(tq.serialization, "FORMAT_VERSION", "?")
    lines = [f"# Norm storage (byte format version {fmt}), d={D}, n={args.n}, numpy backend", "",
             "## Relative decode MSE of unit vectors times a scale (float32 input)", "",
             *scale_sweep(args.n), "", f"## Codec error at unit scale, mean +- s.e. over {args.seeds} seeds",
             "", *error_table(args.n, args.seeds), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
