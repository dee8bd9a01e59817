"""Recipe against luck: ``python -m turboquant_torch.eval_seeds``.

SmolLM2-135M-Instruct (``eval.load_model``) scores three texts available offline, teacher-forced in
``--chunk``-token chunks, with the uncompressed cache and with each recipe x bits x rotation seed, and
reports per recipe the mean, standard deviation and worst value over seeds of the perplexity change,
KL(uncompressed || compressed) and top-1 agreement, per text and pooled. The texts (``--tokens`` each):

``gpl3``
    The GNU GPL v3 that Debian ships (``/usr/share/common-licenses/GPL-3``), as ``eval`` uses.
``repeat``
    A passage of the Apache License 2.0 (Debian's copy) repeated until the text is full: from the
    second copy on, the model can copy from far back, so precise retrieval over the compressed past
    is what is scored.
``recall``
    A generated registry ("Item 17: code 4821.", codes from a fixed seed) at the start, the
    Mozilla Public License 2.0 as filler, then questions about the registry with their answers
    ("Q: What is the code of item 17? A: 4821."): answering needs the registry, which is compressed
    by then.

Recipes (all at the same nominal bits; ``DecodedCopyCache``, i.e. ``TurboQuantCache``'s numbers,
with its default flush interval and sinks, unless said otherwise):

``haar``, ``hadamard2``, ``hadamard``
    TurboQuant mse keys and values with that rotation kind (``hadamard`` does not depend on the seed).
``haar+selectN``, ``hadamard2+selectN``
    The same with ``seed_candidates=N``: each layer's K and V stream keeps, of N seeds, the one that
    reconstructs its first flushed tokens best.
``haar+scoresN``, ``haar+attnN``
    ``haar+selectN`` with the key streams' seeds ranked by an attention criterion instead
    (``seed_criterion="scores"``: squared logit error; ``"attention"``: KL of the attention weights;
    the first flushed keys as their own queries, ``hf_cache.calibration_error``); value streams as
    before.
``haar+kv``, ``hadamard+kv``
    Half a bit moved from values to keys: keys at nominal bits + 0.5, values at - 0.5 (3.5 -> 4 / 3,
    2.5 -> 3 / 2; the same bits per value on average).
``upstream``
    ``baselines.UpstreamCache``: upstream vLLM's shipped recipe, quantize on write, no raw window,
    boundary layers raw; 2.5 bits -> preset ``turboquant_3bit_nc``, 3.5 -> ``turboquant_k3v4_nc``
    (the shipped presets nearest to, and not below, our honest bits per value).

Outputs in ``--out``: ``quality-seeds.md`` (tables), ``quality-seeds.json`` (every run) and
``quality-seeds.png`` (mean KL per recipe with min-max bars over seeds, per text and bits).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .baselines import DecodedCopyCache, UpstreamCache  # noqa: E402
from .eval import TEXT, _machine, load_model, run_pass  # noqa: E402
from .hf_cache import DEFAULT_FLUSH, DEFAULT_SINKS  # noqa: E402

STEM = "quality-seeds"
LICENSES = Path("/usr/share/common-licenses")
TEXTS = ("gpl3", "repeat", "recall")
# Upstream's shipped presets per nominal bits of ours: (key bits, value bits).
UPSTREAM_PRESETS = {2.5: (3, 3), 3.5: (3, 4), 4.0: (4, 4)}
UPSTREAM_NAMES = {(3, 3): "turboquant_3bit_nc", (3, 4): "turboquant_k3v4_nc", (4, 4): "turboquant_4bit_nc"}


# ------------------------------------------------------------------------------------------- texts
def _ids(tok: Any, text: str) -> Tensor:
    return tok(text, return_tensors="pt").input_ids[0]


def make_text(tok: Any, name: str, n: int) -> Tensor:
    """Token ids (1, n) of one evaluation text (module docstring)."""
    if name == "gpl3":
        ids = _ids(tok, TEXT.read_text())
    elif name == "repeat":
        passage = _ids(tok, (LICENSES / "Apache-2.0").read_text())[: max(n // 2, 64)]
        ids = passage.repeat(math.ceil(n / passage.shape[0]))
    elif name == "recall":
        rng = np.random.default_rng(2026)
        items = rng.permutation(90)[:40] + 10
        codes = rng.integers(1000, 10000, items.size)
        registry = "Registry of item codes.\n" + "".join(
            f"Item {i}: code {c}.\n" for i, c in zip(items, codes, strict=True))
        head = _ids(tok, registry + "\n" + (LICENSES / "MPL-2.0").read_text())[: n // 2]
        order = rng.permutation(items.size)
        qa = "".join(f"Q: What is the code of item {items[j]}? A: {codes[j]}.\n" for j in np.tile(order, 4))
        ids = torch.cat([head, _ids(tok, "\n" + qa)])
    else:
        raise ValueError(f"unknown text {name!r}; choose from {TEXTS}")
    if ids.shape[0] < n:
        raise ValueError(f"text {name!r} has {ids.shape[0]} tokens, fewer than the {n} asked for")
    return ids[None, :n]


# ----------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    name: str
    seeded: bool  # whether the figures depend on the seed
    make: Callable[[Any, float, int], Any]  # (model config, bits, seed) -> cache


def recipes(candidates: int) -> dict[str, Recipe]:
    def ours(rotation: str, n: int, criterion: str = "reconstruction", skew: float = 0.0
             ) -> Callable[[Any, float, int], Any]:
        # skew: half a bit moved from values to keys (same bits per value on average).
        return lambda cfg, b, s: DecodedCopyCache(cfg, key_bits=b + skew, value_bits=b - skew, seed=s,
                                                  rotation=rotation, seed_candidates=n,
                                                  seed_criterion=criterion, flush_interval=DEFAULT_FLUSH,
                                                  sinks=DEFAULT_SINKS)

    def upstream(cfg: Any, b: float, s: int) -> Any:
        kb, vb = UPSTREAM_PRESETS[b]
        return UpstreamCache(cfg, key_bits=kb, value_bits=vb)

    out = [Recipe("haar", True, ours("haar", 1)), Recipe("hadamard2", True, ours("hadamard2", 1)),
           Recipe(f"haar+select{candidates}", True, ours("haar", candidates)),
           Recipe(f"hadamard2+select{candidates}", True, ours("hadamard2", candidates)),
           Recipe(f"haar+scores{candidates}", True, ours("haar", candidates, "scores")),
           Recipe(f"haar+attn{candidates}", True, ours("haar", candidates, "attention")),
           Recipe("haar+kv", True, ours("haar", 1, skew=0.5)),
           Recipe("hadamard", False, ours("hadamard", 1)),
           Recipe("hadamard+kv", False, ours("hadamard", 1, skew=0.5)), Recipe("upstream", False, upstream)]
    return {r.name: r for r in out}


def honest_bits(cache: Any, n_tokens: int, layers: int, d: int) -> tuple[float, float]:
    """(bits per value of the compressed tokens, stored bytes / float16 bytes of the whole cache at
    the end of the text: raw sinks, windows and boundary layers counted at 16 bits)."""
    mem = cache.memory()
    heads = cache.num_kv_heads
    values = mem.compressed_tokens * heads * d * 2
    compressed = mem.records + mem.metadata
    raw_values = n_tokens * layers * heads * d * 2 - values
    fp16_bits = n_tokens * layers * heads * d * 2 * 16
    return compressed * 8 / max(values, 1), (compressed * 8 + raw_values * 16) / fp16_bits


@dataclass
class Run:
    text: str
    recipe: str
    bits: float
    seed: int
    dppl_pct: float
    kl: float
    top1: float
    bits_per_value: float
    stored_vs_fp16: float
    seconds: float


# ------------------------------------------------------------------------------------------ report
def _stats(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summary(runs: list[Run], names: list[str], bits: list[float], texts: list[str]) -> str:
    """Markdown: per bits, a pooled table (mean +- sd over seeds and texts, worst seed-text) and a
    per-text table (mean +- sd over seeds)."""
    out = []
    for b in bits:
        out.append(f"\n### {b:g} bits\n\n| recipe | honest bits/value | stored vs fp16 | dPPL % | KL "
                   "| top-1 % | worst KL | worst top-1 % |\n|---|---|---|---|---|---|---|---|")
        for name in names:
            rs = [r for r in runs if r.recipe == name and r.bits == b]
            if not rs:
                continue
            (dp, dps), (kl, kls), (t1, t1s) = (_stats([getattr(r, f) for r in rs])
                                               for f in ("dppl_pct", "kl", "top1"))
            out.append(f"| {name} | {np.mean([r.bits_per_value for r in rs]):.3f} "
                       f"| {100 * np.mean([r.stored_vs_fp16 for r in rs]):.1f}% | {dp:+.3f} +- {dps:.3f} "
                       f"| {kl:.4f} +- {kls:.4f} | {100 * t1:.2f} +- {100 * t1s:.2f} "
                       f"| {max(r.kl for r in rs):.4f} | {100 * min(r.top1 for r in rs):.2f} |")
        out.append(f"\nPer text at {b:g} bits (mean +- sd over seeds; one run for seed-free recipes):\n")
        out.append("| recipe | " + " | ".join(f"{t}: dPPL % / KL / top-1 %" for t in texts) + " |")
        out.append("|---|" + "---|" * len(texts))
        for name in names:
            cells = []
            for t in texts:
                rs = [r for r in runs if r.recipe == name and r.bits == b and r.text == t]
                if not rs:
                    cells.append("-")
                    continue
                (dp, dps), (kl, kls), (t1, t1s) = (_stats([getattr(r, f) for r in rs])
                                                   for f in ("dppl_pct", "kl", "top1"))
                cells.append(f"{dp:+.2f} +- {dps:.2f} / {kl:.4f} +- {kls:.4f} / "
                             f"{100 * t1:.1f} +- {100 * t1s:.1f}")
            if any(c != "-" for c in cells):
                out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(runs: list[Run], names: list[str], bits: list[float], texts: list[str], path: Path) -> None:
    """Mean KL per recipe, min-max over seeds as error bars; one panel per bits, a group per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bits), figsize=(6.5 * len(bits), 4.6), squeeze=False)
    width = 0.8 / len(names)
    for ax, b in zip(axes[0], bits, strict=True):
        for k, name in enumerate(names):
            means, lo, hi = [], [], []
            for t in texts:
                kls = [r.kl for r in runs if r.recipe == name and r.bits == b and r.text == t] or [np.nan]
                means.append(np.mean(kls))
                lo.append(np.mean(kls) - np.min(kls))
                hi.append(np.max(kls) - np.mean(kls))
            xs = np.arange(len(texts)) + (k - (len(names) - 1) / 2) * width
            ax.bar(xs, means, width, yerr=[lo, hi], capsize=3, label=name)
        ax.set_xticks(np.arange(len(texts)), texts)
        ax.set_yscale("log")
        ax.set_ylabel("KL(uncompressed || compressed), mean over seeds (log)")
        ax.set_title(f"{b:g} bits (bars: min-max over seeds)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m turboquant_torch.eval_seeds",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="tokens per text (default 1024)")
    p.add_argument("--chunk", type=int, default=128, help="tokens per forward (default 128)")
    p.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.5], help="nominal bits (default 2.5 3.5)")
    p.add_argument("--seeds", type=int, default=5, help="base seeds 0..N-1 per seeded recipe (default 5)")
    p.add_argument("--candidates", type=int, default=4, help="seed candidates of the select recipes")
    p.add_argument("--texts", nargs="+", default=list(TEXTS), choices=TEXTS)
    p.add_argument("--recipes", nargs="+", default=None, help="subset of recipe names")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output directory")
    p.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="report the runs of these quality-seeds.json files (e.g. one process per text) "
                        "instead of running; --tokens/--chunk/--candidates describe them")
    args = p.parse_args(argv)
    bad = [b for b in args.bits if b not in UPSTREAM_PRESETS]
    if bad:
        p.error(f"--bits {bad}: choose from {sorted(UPSTREAM_PRESETS)} (the upstream presets matched)")
    return args


def sweep(args: argparse.Namespace) -> tuple[list[Run], dict[str, float]]:
    """Every (text, recipe, bits, seed) run of ``args``; returns the runs and the uncompressed
    perplexity of each text."""
    from tqdm import tqdm
    from transformers import DynamicCache

    torch.set_num_threads(args.threads)
    tok, model = load_model(attn_implementation="sdpa")
    layers, d = model.config.num_hidden_layers, model.config.head_dim
    table = recipes(args.candidates)
    names = args.recipes or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {list(table)}")
    jobs = [(t, n, b, s) for t in args.texts for b in args.bits for n in names
            for s in (range(args.seeds) if table[n].seeded else [0])]
    n_chunks = math.ceil(args.tokens / args.chunk)
    bar = tqdm(total=n_chunks * (len(jobs) + len(args.texts)), unit="chunk", file=sys.stderr)
    step = lambda: bar.update(1)  # noqa: E731
    refs: dict[str, tuple[float, list[Tensor]]] = {}
    runs: list[Run] = []
    for text, name, bits, seed in jobs:
        ids = make_text(tok, text, args.tokens)
        if text not in refs:
            bar.set_description(f"{text} uncompressed")
            nll, _, _, ref = run_pass(model, ids, DynamicCache(config=model.config), args.chunk, None, step)
            refs[text] = (math.exp(nll), ref)
        base_ppl, ref = refs[text]
        bar.set_description(f"{text} {name} {bits:g} s{seed}")
        t0 = time.time()
        cache = table[name].make(model.config, bits, seed)
        nll, kl, top1, _ = run_pass(model, ids, cache, args.chunk, ref, step)
        bpv, stored = honest_bits(cache, args.tokens, layers, d)
        runs.append(Run(text, name, bits, seed, 100 * (math.exp(nll) / base_ppl - 1), kl, top1, bpv, stored,
                        time.time() - t0))
    bar.close()
    return runs, {t: p for t, (p, _) in refs.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)  # also what the report names when merging 1-thread runs
    if args.merge:
        runs, ppl, seconds = [], {}, 0.0
        for path in args.merge:
            part = json.loads(Path(path).read_text())
            runs += [Run(**r) for r in part["runs"]]
            ppl.update(part["uncompressed_ppl"])
            seconds += part["seconds"]
        args.texts = [t for t in TEXTS if t in ppl]
    else:
        runs, ppl = sweep(args)
        seconds = time.time() - start
    names = list(dict.fromkeys(r.recipe for r in runs))
    bits = sorted({r.bits for r in runs})
    seeds = max(r.seed for r in runs) + 1

    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    presets = ", ".join(f"{b:g} bits -> {UPSTREAM_NAMES[UPSTREAM_PRESETS[b]]}" for b in bits)
    header = (
        f"# Recipe against luck: seeds x texts on SmolLM2-135M-Instruct\n\n"
        f"`python -m turboquant_torch.eval_seeds --tokens {args.tokens} --chunk {args.chunk} --seeds "
        f"{seeds} --candidates {args.candidates} --bits {' '.join(f'{b:g}' for b in bits)}`, "
        f"{date}, on {_machine()}; {seconds:.0f} s of sweep (summed over processes).\n\n"
        f"Texts ({args.tokens} tokens each, {args.chunk}-token teacher-forced chunks): "
        f"{', '.join(args.texts)} (see the module docstring); uncompressed perplexity "
        + ", ".join(f"{t} {ppl[t]:.3f}" for t in args.texts)
        + f". Our recipes: flush interval {DEFAULT_FLUSH}, {DEFAULT_SINKS} sinks (TurboQuantCache's "
        f"defaults), seeds 0..{seeds - 1} as the cache's base seed. Upstream: {presets}, every token "
        f"quantized on write, first and last 2 layers raw. Honest bits/value: compressed tokens' bytes "
        f"(norms, scales, channel lists, chosen seeds); stored vs fp16: the whole cache at the end of the "
        f"text, raw parts (sinks, window, boundary layers) at 16 bits. KL: mean KL(uncompressed || "
        f"compressed) over next-token distributions; top-1: argmax agreement. sd: over seeds (and texts "
        f"in the pooled table); worst: the largest KL / lowest top-1 of any seed and text.\n"
    )
    text = header + summary(runs, names, bits, args.texts) + "\n"
    (args.out / f"{STEM}.md").write_text(text)
    (args.out / f"{STEM}.json").write_text(json.dumps(
        {"runs": [asdict(r) for r in runs], "uncompressed_ppl": ppl, "seconds": seconds}, indent=1))
    plot(runs, names, bits, args.texts, args.out / f"{STEM}.png")
    print(text)
    print(f"wrote {args.out / STEM}.md, .png, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
