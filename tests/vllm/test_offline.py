"""A real model through vLLM's offline engine: the stock CPU backend and TQ_CODEC, one engine each.

SmolLM2-135M (30 layers, 9 query / 3 KV heads, head_dim 64), bf16, KV-cache budget 256 MiB,
``max_num_batched_tokens=128`` so the 1024-token text is prefilled in 8 chunks and each chunk attends to
a cached, compressed past (plus the raw window and sinks).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import HERE, engine_env

pytestmark = pytest.mark.slow

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def _run(model_dir, out, mode: str, **tq: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(model_dir), str(out), mode],
                          env=engine_env(**tq), timeout=900, capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"engine run {mode} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    return {"stock": _run(model_dir, tmp / "stock.json", "stock"),
            "tq": _run(model_dir, tmp / "tq.json", "tq")}


def _nll(report: dict) -> float:
    lps = report["logprobs"][1:]
    return -sum(lps) / len(lps)


def test_worker_ran_our_backend(runs):
    tq, stock = runs["tq"], runs["stock"]
    forwards = [m for m in tq["markers"] if m["event"] == "forward"]
    assert forwards, tq["markers"]
    assert all(m["pid"] != tq["front_end_pid"] for m in forwards)  # the worker process, not the front end
    shape, dtype = forwards[0]["kv_cache"]
    assert dtype == "torch.uint8" and shape[1:] == [KV_HEADS, tq["block_size"], 64]  # 32 B K + 32 B V
    assert {m["event"] for m in tq["markers"]} >= {"register", "reserve", "forward"}
    assert not [m for m in stock["markers"] if m["event"] == "forward"]


def test_capacity_counts_the_raw_pool(runs):
    tq, stock = runs["tq"], runs["stock"]
    reserve = next(m for m in tq["markers"] if m["event"] == "reserve")
    assert reserve["budget_bytes"] == tq["kv_bytes"] and reserve["raw_bytes"] > 0
    page = LAYERS * KV_HEADS * tq["block_size"] * 64  # bytes of one block, all layers
    assert tq["num_blocks"] == (tq["kv_bytes"] - reserve["raw_bytes"]) // page
    assert tq["kv_cache_size_tokens"] == tq["capacity_tokens"]
    ratio = tq["capacity_tokens"] / stock["capacity_tokens"]
    print(f"KV capacity: stock {stock['capacity_tokens']} tokens, TQ_CODEC {tq['capacity_tokens']} tokens "
          f"(raw pool {reserve['raw_bytes'] / 2**20:.1f} MiB reserved) -> {ratio:.2f}x")
    assert ratio >= 3.5


def test_teacher_forced_logprobs_close_to_stock(runs):
    # Tolerance: docs/calibration.md measured +0.94% perplexity for this recipe (3.5-bit MSE K/V,
    # 128-token raw window, 4 sinks) on the same model and text with fake quantization; the bf16 model
    # and a different attention kernel add a little noise. 3% on perplexity leaves room for that and
    # still fails a backend that quantizes on write (+14%) or reads wrong blocks (far worse).
    stock, tq = runs["stock"], runs["tq"]
    assert len(stock["logprobs"]) == len(tq["logprobs"]) == 1024
    dppl = math.exp(_nll(tq) - _nll(stock)) - 1
    diffs = [abs(a - b) for a, b in zip(stock["logprobs"][1:], tq["logprobs"][1:], strict=True)]
    mean_abs = sum(diffs) / len(diffs)
    print(f"perplexity stock {math.exp(_nll(stock)):.3f}, TQ_CODEC {math.exp(_nll(tq)):.3f} "
          f"({dppl:+.2%}); mean |d logprob| {mean_abs:.4f}")
    assert abs(dppl) < 0.03
    assert mean_abs < 0.15


def test_greedy_text_is_sensible(runs):
    greedy = runs["tq"]["greedy"]
    texts = list(greedy.values())
    assert "Paris" in texts[0]
    assert "def " in texts[1]
    assert texts[2].lstrip().startswith("60, 61")
    for prompt, text in runs["stock"]["greedy"].items():
        print(f"{prompt[-30:]!r}: stock {text!r} / TQ_CODEC {greedy[prompt]!r}")
