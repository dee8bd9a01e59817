"""``model.generate``'s decode step with a Hugging Face cache: ``TurboQuantCache`` on the registered
``"turboquant"`` attention against ``DynamicCache`` on the stock ``"sdpa"`` attention (cuDNN off on a
GPU: flash), on a small random-weight Llama-style model.

- ``time_decode_step``: one forward of one new token per row after a ``tokens``-token prompt (the
  cache grows by a token per sample; a flush every 256 samples is part of the path).
- ``track_kv_bytes``: bytes the cache holds after the prompt (``DynamicCache``: its key and value
  tensors; ``TurboQuantCache``: ``memory().device``).

Model: 4 layers, hidden 512, 8 query / 2 KV heads, head_dim 64, float32 on the CPU, bfloat16 on a GPU;
batch 1. CPU runs the 2048-token prompt only.
"""

from __future__ import annotations

from typing import Any

from .common import Timed

CPU_MAX_TOKENS = 2048


def _setup(cache_kind: str, device: str, tokens: int) -> tuple[Any, Any, Any, Any]:
    try:
        import torch
        from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
        from turboquant_torch import hf_attention
        from turboquant_torch.hf_cache import CACHE_ARG, TurboQuantCache
    except ImportError as exc:
        raise NotImplementedError(f"torch / transformers / turboquant_torch missing: {exc}") from exc
    if device == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("torch has no CUDA device here")
    if device == "cpu" and tokens > CPU_MAX_TOKENS:
        raise NotImplementedError(f"{tokens} tokens: too long for the CPU run")
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=tokens + 4096)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    if cache_kind == "dynamic":
        # The stock attention on flash: torch's own choice on an H100 (cuDNN) builds a plan for every
        # new key length, milliseconds of host time per decode step (benchmarks/RESULTS-hf.md).
        model.set_attn_implementation("sdpa")
        if device == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(False)
    else:
        hf_attention.use(model)
    cache = DynamicCache(config=cfg) if cache_kind == "dynamic" else TurboQuantCache(cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens + 1), device=device, generator=gen)
    with torch.no_grad():
        model(input_ids=ids[:, :tokens], **{CACHE_ARG: cache}, logits_to_keep=1)
    return model, cache, ids[:, tokens:], CACHE_ARG


class HFDecode(Timed):
    params = (("dynamic", "turboquant"), ("cpu", "cuda"), (2048, 16384))
    param_names = ("cache", "device", "tokens")
    timeout = 600

    def setup(self, cache: str, device: str, tokens: int) -> None:
        self.model, self.cache, self.next_ids, self.arg = _setup(cache, device, tokens)
        self.device = device
        self.time_decode_step(cache, device, tokens)  # compiles the kernels outside the samples

    def time_decode_step(self, cache: str, device: str, tokens: int) -> None:
        import torch

        with torch.no_grad():
            self.model(input_ids=self.next_ids, **{self.arg: self.cache})
        if self.device == "cuda":
            torch.cuda.synchronize()

    def track_kv_bytes(self, cache: str, device: str, tokens: int) -> int:
        if cache == "dynamic":
            return int(sum(t.numel() * t.element_size() for lay in self.cache.layers
                           for t in (lay.keys, lay.values)))
        return int(self.cache.memory().device)

    track_kv_bytes.unit = "bytes"  # type: ignore[attr-defined]
