"""TurboQuant KV-cache codec (arXiv 2504.19874): encode, decode, scores and attention on
arrays, and the paged-cache ops a serving engine calls (paged_write, paged_attention).

One API dispatches at run time to a NumPy CPU reference or to GPU backends (Numba CUDA, CuPy), by
where the data lives. Importing this package imports neither numba nor cupy.
"""

from __future__ import annotations

# ``backends`` is the registry subpackage, callable: ``turboquant_codec.backends()`` lists backends.
from . import backends
from .api import attention, decode, encode, scores
from .codebooks import Codebook, lloyd_max
from .config import CodecConfig
from .encoded import Encoded
from .paged import paged_attention, paged_write
from .paged_cache import PagedCache
from .paged_decoder import PagedDecoder
from .transforms import stream_seed

__version__ = "0.1.0"


__all__ = [
    "Codebook",
    "CodecConfig",
    "Encoded",
    "PagedCache",
    "PagedDecoder",
    "attention",
    "backends",
    "decode",
    "encode",
    "lloyd_max",
    "paged_attention",
    "paged_write",
    "scores",
    "stream_seed",
]
