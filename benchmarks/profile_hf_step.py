"""Host time per part of a Hugging Face decode step: ``DynamicCache`` (stock ``"sdpa"``, cuDNN off)
against ``TurboQuantCache`` (``"turboquant"`` attention), steps interleaved.

Wraps the Llama modules (decoder layer, attention, MLP, RMSNorm), the caches' ``update``, the two
attention functions, ``TurboQuantLayer``'s step methods and the garbage collector in ``perf_counter``
timers (about a microsecond each, unlike cProfile's per-call cost), then prints each part's median
host time per step and per layer. The model is ``bench_hf.py gpu``'s (``llama_model``). ``--device
cpu`` is a dry run: a bfloat16 model on the CPU takes the layers' device branch, without graphs.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))

import torch  # noqa: E402
import transformers.models.llama.modeling_llama as llama  # noqa: E402
from bench_hf import llama_model  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.integrations import sdpa_attention  # noqa: E402
from turboquant_torch import hf_attention, hf_cache, step_graph  # noqa: E402
from turboquant_torch.hf_cache import CACHE_ARG, TurboQuantCache  # noqa: E402

spent: dict[str, float] = collections.defaultdict(float)


def timed(f: Any, label: str) -> Any:
    @functools.wraps(f)
    def g(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t0
    return g


def instrument() -> None:
    parts = [(llama.LlamaDecoderLayer, "forward", "decoder layer"),
             (llama.LlamaAttention, "forward", "attention"), (llama.LlamaMLP, "forward", "mlp"),
             (llama.LlamaRMSNorm, "forward", "rmsnorm"), (DynamicCache, "update", "cache.update"),
             (TurboQuantCache, "update", "cache.update"), (step_graph.StepGraph, "__call__", "tq StepGraph"),
             (step_graph.StepGraph, "replay", "tq StepGraph.replay"),
             (torch.cuda.CUDAGraph, "replay", "graph replay")]
    methods = ("update", "commit", "_commit", "run_step", "paged_args", "can_page",
               "_advance", "_fast_append_next", "_plan_fast")
    parts += [(hf_cache.TurboQuantLayer, m, f"tq {m}") for m in methods]
    parts += [(hf_cache, "check_states", "tq check_states"), (hf_attention, "_real_new", "tq _real_new"),
              (hf_attention, "_paged", "tq _paged"), (hf_attention, "_dense", "tq _dense"),
              (hf_attention, "_attend", "tq _attend (eager op)")]
    for owner, name, label in parts:
        setattr(owner, name, timed(getattr(owner, name), label))
    started = [0.0]

    def collector(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent["garbage collection"] += time.perf_counter() - started[0]

    gc.callbacks.append(collector)
    AttentionInterface.register("sdpa", timed(sdpa_attention.sdpa_attention_forward, "attention function"))
    AttentionInterface.register(hf_attention.NAME,
                                timed(hf_attention.turboquant_attention, "attention function"))


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=8, help="steps left out of the medians")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = llama_model(dev, args.layers, 2048, args.tokens + args.steps + 64, torch.bfloat16)
    cfg = model.config
    if dev.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    instrument()
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens + args.steps), device=dev, generator=gen)
    caches = {"DynamicCache": (DynamicCache(config=cfg), "sdpa"),
              "TurboQuantCache": (TurboQuantCache(cfg), hf_attention.NAME)}
    for cache, impl in caches.values():
        model.set_attn_implementation(impl)
        model(input_ids=ids[:, : args.tokens], **{CACHE_ARG: cache}, logits_to_keep=1)
    sync()
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in caches}
    for s in range(args.steps):
        for name in list(caches)[:: 1 if s % 2 else -1]:
            cache, impl = caches[name]
            model.set_attn_implementation(impl)
            sync()
            spent.clear()
            t0 = time.perf_counter()
            model(input_ids=ids[:, args.tokens + s : args.tokens + s + 1], **{CACHE_ARG: cache})
            t1 = time.perf_counter()
            sync()
            steps[name].append({"step (wall)": time.perf_counter() - t0, "forward (host)": t1 - t0, **spent})
    for name, rows in steps.items():
        print(f"{name}: median of steps {args.warmup + 1}-{args.steps}, per step and per layer")
        kept = rows[args.warmup:]
        med = {k: statistics.median(r.get(k, 0.0) for r in kept) for k in set().union(*kept)}
        for k, v in sorted(med.items(), key=lambda kv: -kv[1]):
            print(f"  {k:24s} {1e3 * v:8.3f} ms {1e6 * v / args.layers:9.1f} us/layer")
        at = max(range(len(kept)), key=lambda i: kept[i]["step (wall)"])
        print(f"{name}: the slowest of those steps (step {args.warmup + at + 1}), above its median")
        for k, v in sorted(kept[at].items(), key=lambda kv: med.get(kv[0], 0.0) - kv[1]):
            if v - med.get(k, 0.0) > 20e-6:
                print(f"  {k:24s} {1e3 * (v - med.get(k, 0.0)):8.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
