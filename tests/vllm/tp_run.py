"""One offline vLLM engine run of a tiny random-weight Llama at a given tensor-parallel size, as JSON.

usage: python tp_run.py MODEL_DIR OUT_JSON TP stock|tq
       python tp_run.py --build MODEL_DIR      (write the checkpoint: offline, seconds)

The checkpoint (``build``): 2 layers, 8 query / 4 KV heads of head_dim 64, float32, seeded random
weights with a large initializer range so that greedy choices are clear rather than near-ties, and no
tokenizer (prompts are token ids). Each of the 4 KV heads is one codec stream: at TP=2 each rank
holds 2 of them. The run reports greedy token ids for prompts longer than the raw window (so the
compressed past is read) and the plugin's marker lines (reservation and forward per rank).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, PROMPT_LENS, NEW_TOKENS = 512, (300, 200, 40), 16
KV_BYTES = 64 * 2**20


def build(out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                         max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENS]


def main() -> None:
    model, out_path, tp, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    marker = out_path + ".marker"
    if os.path.exists(marker):
        os.remove(marker)
    os.environ["TQ_MARKER_FILE"] = marker
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vLLM's automatic binding gives each rank its own NUMA node and refuses with one node ("Not
        # enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"): split the cores instead.
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < tp:
            raise SystemExit(f"TP={tp} needs at least {tp} cores, this process may use {cores}")
        groups = [cores[i * len(cores) // tp:(i + 1) * len(cores) // tp] for i in range(tp)]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=model, dtype="float32", kv_cache_memory_bytes=KV_BYTES, max_model_len=1024,
              tensor_parallel_size=tp, enforce_eager=True, seed=0, skip_tokenizer_init=True,
              max_num_seqs=4, max_num_batched_tokens=256)
    if mode == "tq":
        kw["attention_backend"] = "CUSTOM"
    llm = LLM(**kw)
    gens = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts()],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                       detokenize=False))
    markers = [json.loads(line) for line in open(marker)] if os.path.exists(marker) else []
    report = {"tp": tp, "mode": mode, "front_end_pid": os.getpid(),
              "greedy": [list(g.outputs[0].token_ids) for g in gens], "markers": markers}
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":  # vLLM's CPU platform spawns its engine and worker processes
    if sys.argv[1] == "--build":
        build(sys.argv[2])
    else:
        main()
