"""What the plugin reads from vLLM's config: the model shape (per tensor-parallel rank) and the raw
side pool's size, computed the same way in the worker (reservation) and the builder (allocation)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, TurboQuantConfig
from .raw_pool import raw_pool_blocks, raw_pool_bytes

logger = logging.getLogger("vllm.turboquant_vllm")


@functools.cache
def env_config() -> TurboQuantConfig:
    """The process's configuration from ``TQ_*`` (identical in every vLLM process: same environment)."""
    cfg = TurboQuantConfig.from_env()
    cfg.export_env()
    return cfg


def is_selected(vllm_config: Any) -> bool:
    """Whether vLLM's attention backend is the CUSTOM slot (ours once registered)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return backend == AttentionBackendEnum.CUSTOM


def validated_config(vllm_config: Any) -> TurboQuantConfig:
    """``env_config()`` checked against the served model (ConfigError names the variable)."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    hf = mc.hf_text_config
    device_type = str(getattr(vllm_config.device_config, "device_type", "cpu"))
    device = "cuda" if device_type.startswith("cuda") else "cpu"
    head = mc.get_head_size()
    v_head = getattr(hf, "v_head_dim", None)
    if v_head is not None and v_head != head:
        raise ConfigError(f"TQ_CODEC needs equal key and value head sizes, model has {head} and {v_head}")
    return env_config().validate(
        num_layers=getattr(hf, "num_hidden_layers", None),
        num_heads=getattr(hf, "num_attention_heads", None),
        num_kv_heads=mc.get_total_num_kv_heads(),
        head_dim=head,
        max_seq_len=mc.max_model_len,
        device=device if pc is not None else None,
    )


@dataclass(frozen=True)
class RawReservation:
    raw_seqs: int
    num_raw_blocks: int
    bytes: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


def raw_reservation(vllm_config: Any, block_size: int | None = None) -> RawReservation:
    """The raw side pool of this rank: rows and bytes (all layers of this pipeline stage, K and V)."""
    cfg = env_config()
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    bs = int(block_size or vllm_config.cache_config.block_size)
    raw_seqs = cfg.raw_seqs if cfg.raw_seqs is not None else int(vllm_config.scheduler_config.max_num_seqs)
    rows = raw_pool_blocks(raw_seqs, bs, cfg.flush_interval, cfg.sink_tokens)
    layers = mc.get_num_layers(pc)
    heads = mc.get_num_kv_heads(pc)
    d = mc.get_head_size()
    itemsize = mc.dtype.itemsize
    return RawReservation(raw_seqs, rows, raw_pool_bytes(rows, layers, bs, heads, d, itemsize), bs,
                          layers, heads, d)
