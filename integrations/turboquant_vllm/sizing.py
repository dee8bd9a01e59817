"""What the plugin reads from vLLM's config: the model shape (per tensor-parallel rank) and the raw
side pool's size, chosen by the worker out of the KV-cache budget and allocated by the builder."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, TurboQuantConfig
from .raw_pool import blocks_per_seq, raw_pool_bytes

logger = logging.getLogger("vllm.turboquant_vllm")


@functools.cache
def env_config() -> TurboQuantConfig:
    """The process's configuration from ``TQ_*`` (identical in every vLLM process: same environment)."""
    return TurboQuantConfig.from_env()


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
    """The raw side pool chosen for one rank (all layers of its pipeline stage, K and V).

    Attributes
    ----------
    raw_seqs : int
        Sequences asked for (``TQ_RAW_SEQS``, else vLLM's ``max_num_seqs``).
    seqs_covered : int
        Sequences whose whole window and sinks fit (``<= raw_seqs``); later ones read compressed.
    num_raw_blocks : int
        Rows of the pool (``seqs_covered * blocks_per_seq``).
    bytes : int
        Memory of the pool.
    budget_bytes : int or None
        The KV-cache budget it was cut from (None: unknown, not capped).
    share : float
        ``TQ_RAW_SHARE``: the most of ``budget_bytes`` the pool may take.
    """

    raw_seqs: int
    seqs_covered: int
    num_raw_blocks: int
    bytes: int
    budget_bytes: int | None
    share: float
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    blocks_per_seq: int

    @property
    def bytes_per_seq(self) -> int:
        """Memory of one sequence's window and sinks, all layers of the rank."""
        return raw_pool_bytes(self.blocks_per_seq, self.num_layers, self.block_size, self.num_kv_heads,
                              self.head_dim, self.dtype_bytes)

    def describe(self) -> str:
        """One log line: what was chosen and why."""
        if self.blocks_per_seq == 0 or self.raw_seqs == 0:
            return "no raw side pool (TQ_RAW_WINDOW=0 and TQ_SINK_TOKENS=0, or TQ_RAW_SEQS=0)"
        budget = "unknown budget" if self.budget_bytes is None else f"{self.budget_bytes / 2**20:.1f} MiB"
        per_seq = self.bytes_per_seq / 2**20
        line = (f"raw side pool {self.num_raw_blocks} rows of {self.block_size} tokens = "
                f"{self.bytes / 2**20:.1f} MiB ({self.blocks_per_seq} rows = {per_seq:.2f} MiB per sequence "
                f"over {self.num_layers} layers x {self.num_kv_heads} KV heads): raw window for "
                f"{self.seqs_covered} of {self.raw_seqs} sequences, within TQ_RAW_SHARE={self.share:g} of "
                f"the {budget} KV-cache budget")
        if self.seqs_covered < self.raw_seqs:
            line += ("; sequences beyond the pool read their recent tokens compressed (raise TQ_RAW_SHARE "
                     "or the KV-cache memory for more)")
        return line


def plan_raw_pool(cfg: TurboQuantConfig, *, budget_bytes: int | None, max_num_seqs: int, block_size: int,
                  num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> RawReservation:
    """Size the raw side pool: whole sequences' windows, as many as asked for and as fit the share.

    Parameters
    ----------
    cfg : TurboQuantConfig
        Supplies ``raw_seqs`` (None: ``max_num_seqs``), ``raw_share``, ``raw_window``, ``sink_tokens``.
    budget_bytes : int or None
        The rank's KV-cache budget; the pool takes at most ``cfg.raw_share`` of it (None: no cap).
    max_num_seqs : int
        vLLM's scheduler limit (the default for ``raw_seqs``).
    block_size, num_layers, num_kv_heads, head_dim, dtype_bytes : int
        The rank's cache geometry (KV heads of this rank under tensor parallelism).

    Returns
    -------
    RawReservation
        Never refuses: with a budget too small for one sequence the pool is empty and every token past
        the new ones is read compressed.
    """
    raw_seqs = cfg.raw_seqs if cfg.raw_seqs is not None else int(max_num_seqs)
    bps = blocks_per_seq(block_size, cfg.raw_window, cfg.sink_tokens)
    per_seq = raw_pool_bytes(bps, num_layers, block_size, num_kv_heads, head_dim, dtype_bytes)
    covered = raw_seqs
    if budget_bytes is not None and per_seq > 0:
        covered = min(raw_seqs, int(cfg.raw_share * max(int(budget_bytes), 0)) // per_seq)
    covered = max(covered, 0) if bps else 0
    rows = covered * bps
    pool_bytes = raw_pool_bytes(rows, num_layers, block_size, num_kv_heads, head_dim, dtype_bytes)
    return RawReservation(raw_seqs=raw_seqs, seqs_covered=covered, num_raw_blocks=rows, bytes=pool_bytes,
                          budget_bytes=None if budget_bytes is None else int(budget_bytes),
                          share=float(cfg.raw_share), block_size=block_size, num_layers=num_layers,
                          num_kv_heads=num_kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes,
                          blocks_per_seq=bps)


#: The reservation the worker chose in this process (each rank is its own process), which the metadata
#: builder of the same process allocates.
_chosen: RawReservation | None = None


def raw_reservation(vllm_config: Any, block_size: int | None = None,
                    budget_bytes: int | None = None) -> RawReservation:
    """The raw side pool of this rank (all layers of this pipeline stage, K and V).

    The worker calls it with the budget vLLM measured (``budget_bytes``) and its choice is kept; later
    calls without a budget (the metadata builder) get that choice. Without one (a worker that does not
    reserve), the budget is ``--kv-cache-memory-bytes`` if given, else the compressed block pool's size.
    """
    global _chosen
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    bs = int(block_size or vllm_config.cache_config.block_size)
    if budget_bytes is None and _chosen is not None and _chosen.block_size == bs:
        return _chosen
    cfg = env_config()
    layers, heads, d = mc.get_num_layers(pc), mc.get_num_kv_heads(pc), mc.get_head_size()
    remember = budget_bytes is not None
    if budget_bytes is None:
        cache = vllm_config.cache_config
        budget_bytes = getattr(cache, "kv_cache_memory_bytes", None)
        blocks = getattr(cache, "num_gpu_blocks", None)
        if not budget_bytes and blocks:
            budget_bytes = int(blocks) * bs * layers * heads * cfg.state_bytes(d)
    res = plan_raw_pool(cfg, budget_bytes=budget_bytes or None,
                        max_num_seqs=int(vllm_config.scheduler_config.max_num_seqs), block_size=bs,
                        num_layers=layers, num_kv_heads=heads, head_dim=d, dtype_bytes=mc.dtype.itemsize)
    if remember:
        _chosen = res
    return res
