"""``TQCpuPlatform``: vLLM's CPU platform, honouring ``--attention-backend CUSTOM``.

With CUSTOM selected it also (1) checks the TQ_* configuration against the model at start-up, (2) defaults
the block size to 16 (smaller blocks make the raw window cheaper: a window of W tokens pins at most
ceil(W / block) + 1 blocks) unless ``--block-size`` was given, and (3) runs the worker subclass that
reserves the raw side pool out of the KV-cache budget.
"""

from __future__ import annotations

import logging

from vllm.platforms.cpu import CpuPlatform

logger = logging.getLogger("vllm.turboquant_vllm")

DEFAULT_BLOCK_SIZE = 16
STOCK_CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
TQ_CPU_WORKER = "turboquant_vllm.worker.TQCPUWorker"


class TQCpuPlatform(CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:  # type: ignore[no-untyped-def]
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if selected_backend == AttentionBackendEnum.CUSTOM:
            from . import register

            register()
            cfg = attn_selector_config
            unsupported = [name for name in ("use_mla", "use_sparse", "has_sink", "has_sliding_window",
                                             "use_non_causal", "use_kv_connector", "use_pcp", "use_dcp")
                           if getattr(cfg, name, False)]
            if unsupported:
                raise ValueError(f"TQ_CODEC (CUSTOM) attention does not support: {', '.join(unsupported)}")
            if str(getattr(cfg, "kv_cache_dtype", "auto")) not in ("auto", "None"):
                raise ValueError(
                    f"TQ_CODEC (CUSTOM) attention compresses the cache itself: use --kv-cache-dtype auto, "
                    f"not {cfg.kv_cache_dtype}"
                )
            return AttentionBackendEnum.CUSTOM.get_path()
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:  # type: ignore[no-untyped-def]
        super().check_and_update_config(vllm_config)
        from .sizing import is_selected, validated_config

        if vllm_config.model_config is None or not is_selected(vllm_config):
            return
        from . import register

        register()
        cfg = validated_config(vllm_config)
        cache = vllm_config.cache_config
        if not cache.user_specified_block_size:
            cache.block_size = DEFAULT_BLOCK_SIZE
        pc = vllm_config.parallel_config
        if pc.worker_cls in ("auto", STOCK_CPU_WORKER):
            pc.worker_cls = TQ_CPU_WORKER
        elif pc.worker_cls != TQ_CPU_WORKER:
            logger.warning("TQ_CODEC: custom worker %s: the raw side pool is NOT reserved out of the KV "
                           "budget (vLLM's capacity figure overstates by its size)", pc.worker_cls)
        logger.info("TQ_CODEC attention: %s, block size %d", cfg.describe(), cache.block_size)
