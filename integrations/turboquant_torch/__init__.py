"""TurboQuant on torch tensors: codec custom ops and paged compressed-cache ops.

Modules
-------
ops
    The codec as ``torch.library`` custom ops in the ``turboquant`` namespace (``encode``, ``decode``,
    ``scores``, ``attention``), each with a shape-only fake implementation so ``torch.compile`` can
    trace callers; plus ``TorchCodec``, a configuration with its fixed channel permutation.
    CPU tensors run the NumPy reference through zero-copy views; CUDA tensors run the GPU backends of
    ``turboquant_codec`` (``backend="auto"``), handed back zero-copy.
paged
    The ops a paged KV cache (vLLM) needs: write compressed records by ``slot_mapping``, write a raw
    side pool of recent/sink blocks, choose which blocks need raw copies, and attention over block
    tables for batches mixing prefill and decode requests; views of vLLM's packed K+V cache tensor.

The codec maths lives in ``turboquant_codec`` only; this package moves tensors and masks.
"""

from __future__ import annotations

from .ops import TorchCodec, attention, decode, encode, scores
from .paged import (
    kv_state_bytes,
    paged_attention,
    raw_blocks_needed,
    split_kv_cache,
    write_compressed,
    write_raw,
)

__all__ = [
    "TorchCodec",
    "attention",
    "decode",
    "encode",
    "kv_state_bytes",
    "paged_attention",
    "raw_blocks_needed",
    "scores",
    "split_kv_cache",
    "write_compressed",
    "write_raw",
]
