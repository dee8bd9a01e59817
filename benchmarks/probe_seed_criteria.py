"""Do the seed criteria pick the seeds that serve the model's own later queries? (issue 19, item 1)

SmolLM2-135M (``eval.load_model``), the first 384 tokens of ``eval_seeds``' ``repeat`` text, one
uncompressed forward with the post-RoPE queries and keys of every layer recorded. Per key stream
(layer x base seed 0..4, TurboQuant mse keys, Haar, 4 candidates as ``TurboQuantCache`` would
try them on its first flush: the keys of tokens 4..259), each candidate's

- ``reconstruction``, ``scores``, ``attention``: ``hf_cache.calibration_error`` on those keys
  (what the cache can compute: the keys as their own queries);
- ``oracle``: KL of the attention weights of the model's real queries at tokens 260..383 (the
  next 124 tokens, GQA heads) over the calibration keys, exact against reconstructed.

Reports how often each criterion picks the oracle's best candidate (chance: 1 in 4), and the
geometric mean over streams of oracle(chosen) / oracle(base seed): below 1 means the criterion's
choice helps the later queries on the calibrated tokens.

Usage: python benchmarks/probe_seed_criteria.py [--bits 3.5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from turboquant_torch.eval import load_model
from turboquant_torch.eval_seeds import make_text
from turboquant_torch.hf_cache import TurboQuantizer, calibration_error

from turboquant_codec.transforms import stream_seed

CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
CRITERIA = ("reconstruction", "scores", "attention")


def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
            **kwargs: Any) -> Any:
    CAPTURED[module.layer_idx] = (query.detach().double(), key.detach().double())
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def oracle(q: torch.Tensor, k: torch.Tensor, rec: torch.Tensor) -> float:
    """sum over query heads and queries of KL(softmax(q k^T / sqrt d) || softmax(q rec^T / sqrt d));
    q (Hq, m, d) with Hq a multiple of k's (H, n, d) heads."""
    group = q.shape[0] // k.shape[0]
    kk, rr = (t.repeat_interleave(group, 0) for t in (k, rec))
    d = q.shape[-1]
    log_p = (q @ kk.transpose(-1, -2) / math.sqrt(d)).log_softmax(-1)
    log_q = (q @ rr.transpose(-1, -2) / math.sqrt(d)).log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def _gmean(xs: list[float]) -> float:
    return float(np.exp(np.mean(np.log(xs))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, nargs="+", default=[3.5, 2.5])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    AttentionInterface.register("capture", capture)
    tok, model = load_model(attn_implementation="capture")
    ids = make_text(tok, "repeat", 768)[:, :384]
    with torch.no_grad():
        model(ids)
    text = "".join(report(b, args.seeds) for b in args.bits)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def report(bits: float, n_seeds: int) -> str:
    """One bit width's table (module docstring)."""
    calib, later = slice(4, 260), slice(260, 384)
    picks = {c: 0 for c in CRITERIA}
    gains: dict[str, list[float]] = {c: [] for c in CRITERIA}
    spread, streams = [], 0
    for layer, (q, k) in sorted(CAPTURED.items()):
        x = k[:, :, calib].float()
        for base in range(n_seeds):
            tq = TurboQuantizer(k.shape[-1], bits, "mse", stream_seed(base, 2 * layer), "haar", 4)
            tq.calibrate(x)  # the channel split; one candidate (the base) kept for now
            seeds = tq.candidate_seeds()
            errs: dict[str, list[float]] = {c: [] for c in (*CRITERIA, "oracle")}
            h, n, d = x.shape[1:]
            for s in seeds:
                codec = tq._with_seed(s)
                rec = codec.decode(codec.encode(x.transpose(0, 1).reshape(h, n, d))).reshape(h, 1, n, d)
                rec = rec.transpose(0, 1)
                for c in CRITERIA:
                    errs[c].append(calibration_error(x, rec, c))
                errs["oracle"].append(oracle(q[0, :, later], k[0, :, calib], rec[0].double()))
            best = int(np.argmin(errs["oracle"]))
            spread.append(max(errs["oracle"]) / min(errs["oracle"]))
            for c in CRITERIA:
                j = int(np.argmin(errs[c]))
                picks[c] += j == best
                gains[c].append(errs["oracle"][j] / errs["oracle"][0])
            gains.setdefault("oracle", []).append(min(errs["oracle"]) / errs["oracle"][0])
            streams += 1
    lines = [f"Seed criteria against the model's later queries: SmolLM2-135M, `repeat` tokens 4..259 "
             f"calibrated, queries 260..383, {bits:g}-bit mse keys, Haar, 4 candidates, "
             f"{streams} key streams (30 layers x {n_seeds} base seeds).", "",
             f"Oracle KL across a stream's 4 candidates, max / min: median {np.median(spread):.3f}.", "",
             "| criterion | picks the oracle's best | oracle(chosen) / oracle(base seed), geometric mean |",
             "|---|---|---|"]
    for c in CRITERIA:
        lines.append(f"| {c} | {picks[c]} / {streams} ({100 * picks[c] / streams:.0f}%; chance 25%) | "
                     f"{_gmean(gains[c]):.3f} |")
    lines.append(f"| oracle itself | {streams} / {streams} | {_gmean(gains['oracle']):.3f} |")
    return "\n".join(lines) + "\n\n"


if __name__ == "__main__":
    main()
