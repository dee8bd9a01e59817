"""One offline vLLM engine run, reported as JSON (run in a subprocess by the tests).

usage: python engine_run.py MODEL_DIR OUT_JSON stock|tq [TEXT_TOKENS]

Environment: TQ_* configure the TQ_CODEC backend (inherited by vLLM's spawned processes); the script
sets TQ_MARKER_FILE itself. Reports: vLLM's KV capacity (blocks x block size, and its "KV cache size"
figure), teacher-forced log-probabilities of the first TEXT_TOKENS tokens of the GPL-3 text (prefill in
chunks of 128 tokens, so later chunks attend to a cached, compressed past), greedy completions, and
the marker lines written by the processes that ran the backend.
"""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = "/usr/share/common-licenses/GPL-3"
PROMPTS = [
    "The capital of France is",
    "Here is a Python function that returns the sum of a list:\n",
    "Count: " + ", ".join(str(i) for i in range(1, 60)) + ",",
]
KV_BYTES = 256 * 2**20


def main() -> None:
    model, out_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    text_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
    marker = out_path + ".marker"
    if os.path.exists(marker):
        os.remove(marker)
    os.environ["TQ_MARKER_FILE"] = marker
    t0 = time.time()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=model, dtype="bfloat16", kv_cache_memory_bytes=KV_BYTES, max_model_len=2048,
              max_num_seqs=4, max_num_batched_tokens=128, enforce_eager=True, seed=0)
    if mode == "tq":
        kw["attention_backend"] = "CUSTOM"
    llm = LLM(**kw)
    t1 = time.time()
    cc = llm.llm_engine.vllm_config.cache_config
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(open(TEXT).read())["input_ids"][:text_tokens]
    res = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    plp = res[0].prompt_logprobs
    logprobs = [None] + [float(plp[i][ids[i]].logprob) for i in range(1, len(ids))]
    t2 = time.time()
    gens = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))
    t3 = time.time()
    markers = []
    if os.path.exists(marker):
        markers = [json.loads(line) for line in open(marker)]
    report = {
        "mode": mode,
        "front_end_pid": os.getpid(),
        "num_blocks": cc.num_gpu_blocks,
        "block_size": cc.block_size,
        "capacity_tokens": cc.num_gpu_blocks * cc.block_size,
        "kv_cache_size_tokens": getattr(cc, "kv_cache_size_tokens", None),
        "kv_bytes": KV_BYTES,
        "text_tokens": len(ids),
        "logprobs": logprobs,
        "greedy": {p: g.outputs[0].text for p, g in zip(PROMPTS, gens, strict=True)},
        "markers": markers,
        "tq_env": {k: v for k, v in os.environ.items() if k.startswith("TQ_")},
        "seconds": {"engine_start": t1 - t0, "logprobs": t2 - t1, "generate": t3 - t2},
    }
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":  # vLLM's CPU platform spawns its engine and worker processes
    main()
