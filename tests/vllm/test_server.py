"""The OpenAI-compatible API server with ``--attention-backend CUSTOM``: both endpoints, then a bounded
concurrent load whose greedy outputs must equal the same prompts sent one at a time.

The server runs in its own subprocess on 127.0.0.1 and is stopped by its PID (children first found by
PID), always, even when a test fails.
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
           "--max-num-seqs", "16", "--seed", "0"]
    if os.environ.get("TQ_TEST_SERVER_BACKEND", "CUSTOM") != "stock":  # stock: the baseline, by hand
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
        yield {"base": base, "model": str(model_dir), "marker": marker, "log": log, "pid": proc.pid}
    finally:
        _stop(proc)
        assert proc.poll() is not None


def _complete(server, prompt: str, max_tokens: int = 12) -> str:
    body = {"model": server["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return _post(server["base"] + "/v1/completions", body)["choices"][0]["text"]


def test_completions_and_chat(server):
    text = _complete(server, "The capital of France is", 16)
    assert "Paris" in text
    chat = _post(server["base"] + "/v1/chat/completions", {
        "model": server["model"], "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    answer = chat["choices"][0]["message"]["content"]
    assert chat["choices"][0]["message"]["role"] == "assistant" and "Paris" in answer, answer
    markers = [json.loads(line) for line in open(server["marker"])]
    forwards = [m for m in markers if m["event"] == "forward"]
    assert forwards and all(m["pid"] != server["pid"] for m in forwards)
    assert "KV cache size" in server["log"].read_text()


def test_concurrent_load_matches_sequential(server):
    sequential = {p: _complete(server, p) for p in PROMPTS}
    load = PROMPTS * 4  # 64 requests, 16 at a time (repeats also exercise prefix-cache hits)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda p: _complete(server, p), load))
    elapsed = time.time() - t0
    mismatches = [(p, sequential[p], r) for p, r in zip(load, results, strict=True) if r != sequential[p]]
    print(f"64 requests, 16 concurrent: {elapsed:.1f} s; mismatches {len(mismatches)}")
    assert not mismatches, mismatches[:5]
    assert os.path.exists(server["marker"])
