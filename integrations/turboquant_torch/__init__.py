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
    The paged ops of ``turboquant_codec`` as torch ops (write records and raw copies by
    ``slot_mapping``; attention over block tables for batches mixing prefill and decode requests),
    which blocks need raw copies, and views of vLLM's packed K+V cache tensor.
hf_cache
    ``TurboQuantCache``: a Hugging Face transformers cache holding paged TurboQuant records, raw
    sinks and a raw recent window; importing it imports transformers, so it loads on first use.
hf_attention
    The ``"turboquant"`` attention registered with transformers (attention and mask interfaces),
    which decode steps run as one paged op per layer over the records; ``use(model)`` selects it.
baselines, eval
    The real-model evaluation (``python -m turboquant_torch.eval``), its comparison recipes and the
    earlier decoded-copy cache (``DecodedCopyCache``) the paged one is checked against.

The codec maths lives in ``turboquant_codec`` only; this package moves tensors and masks.
"""

from __future__ import annotations

from typing import Any

from .ops import TorchCodec, attention, decode, encode, scores
from .paged import (
    kv_state_bytes,
    paged_attention,
    raw_blocks_needed,
    split_kv_cache,
    write_beside,
    write_compressed,
)

__all__ = [
    "TorchCodec",
    "TurboQuantCache",
    "attention",
    "decode",
    "encode",
    "kv_state_bytes",
    "paged_attention",
    "raw_blocks_needed",
    "scores",
    "split_kv_cache",
    "write_beside",
    "write_compressed",
]


def __getattr__(name: str) -> Any:
    # transformers is heavy and optional: import the HF cache only when it is asked for.
    if name == "TurboQuantCache":
        from .hf_cache import TurboQuantCache

        return TurboQuantCache
    raise AttributeError(f"module 'turboquant_torch' has no attribute {name!r}")
