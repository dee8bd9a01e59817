"""Tensor parallel: the plugin at ``tensor_parallel_size=2`` on CPU gives TP=1's greedy output.

A tiny random-weight Llama (2 layers, 8 query / 4 KV heads, head_dim 64, float32; ``tp_run.build``)
is written by the test, offline. At TP=2 each rank holds 2 of the 4 KV heads and its own raw side
pool, sized per rank (half the heads: half the bytes per sequence). Prompts of 300 and 200 tokens
are longer than the 128-token raw window and are prefilled in 256-token chunks, so both the
compressed past and the raw window are read.

vLLM's automatic CPU binding wants one NUMA node per rank and refuses on a one-node machine ("Not
enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"), so ``tp_run`` binds each rank to
its own share of the cores (``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import HERE, engine_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama-4kv"
    subprocess.run([sys.executable, str(HERE / "tp_run.py"), "--build", str(out)], check=True,
                   env=engine_env(), timeout=300)
    return out


def _run(model, out, tp: int, mode: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "tp_run.py"), str(model), str(out), str(tp), mode],
                          env=engine_env(), timeout=600, capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"TP={tp} {mode} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    return {tp: _run(tiny_model, tmp / f"tq{tp}.json", tp, "tq") for tp in (1, 2)}


def test_tp2_greedy_equals_tp1(runs):
    one, two = runs[1]["greedy"], runs[2]["greedy"]
    print(f"TP=1 greedy {one}\nTP=2 greedy {two}")
    for tokens in one:
        assert len(tokens) == 16 and len(set(tokens)) > 1  # a real continuation, not one repeated id
    assert two == one


def test_each_rank_holds_half_the_heads_and_its_own_raw_pool(runs):
    one, two = runs[1]["markers"], runs[2]["markers"]
    fwd1 = [m for m in one if m["event"] == "forward"]
    fwd2 = [m for m in two if m["event"] == "forward"]
    assert len({m["pid"] for m in fwd1}) == 1 and fwd1[0]["num_kv_heads"] == 4
    assert len({m["pid"] for m in fwd2}) == 2  # one worker process per rank
    assert all(m["num_kv_heads"] == 2 and m["kv_cache"][0][1] == 2 for m in fwd2)
    res1 = [m for m in one if m["event"] == "reserve"]
    res2 = [m for m in two if m["event"] == "reserve"]
    assert len(res1) == 1 and len(res2) == 2 and len({m["pid"] for m in res2}) == 2
    for m in res2:
        assert m["num_kv_heads"] == 2 and 2 * m["bytes_per_seq"] == res1[0]["bytes_per_seq"]
        fits = int(m["raw_share"] * m["budget_bytes"]) // m["bytes_per_seq"]
        assert m["seqs_covered"] == min(m["raw_seqs"], fits)
