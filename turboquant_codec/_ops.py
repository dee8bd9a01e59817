"""The op contract, declared once: every backend module implements these functions.

Backends receive arrays already converted by their own ``asarray`` and validated by the public API
(shapes, dtypes, finiteness, configuration); they return arrays of their own library. Every op is
defined by the NumPy reference backend (``backends/numpy_ref.py``); ``CAPABILITIES``
(``capabilities.py``) says which backend serves which op.

===============  ====================================================  =================================
op               arguments                                             returns
===============  ====================================================  =================================
encode           x (*lead, n, d) float16/bfloat16/float32, cfg,        (records, channels)
                 channels ((*lead, d) uint16 or None: choose the
                 outlier channels)
decode           enc: Encoded                                          (*lead, n, d) float32
scores           q (*lead, m, d), keys: Encoded (*lead, n, d)          (*lead, m, n) float32
attention        q (*lead, h_q, d), k, v: Encoded (*lead, h_kv, n,     (*lead, h_q, d) float32
                 d), scale, k_tail/v_tail (*lead, h_kv, t, d) or None
paged_write      cache: PagedCache, key/value [T, H, d],               (k_channels, v_channels)
                 slot_mapping [<= T]                                   (cache written in place)
paged_attention  cache: PagedCache, query [T, h_q, d], key/value       out [T, h_q, d] (written in
                 [T, H, d], block_table [B, max_blocks], seq_lens      place, rows of padding tokens
                 [B], query_start_loc [B + 1], scale, out,             untouched)
                 num_decodes (int or None)
===============  ====================================================  =================================

Optional, for GPU backends: ``paged_attention_replay`` (the arguments of a ``paged_attention``
call just made) returns a callable that repeats that call holding no array (its launches on the
then current stream), or None; the public API replays it for later calls with the same arrays
(addresses, layouts) and scalars.

Optional, for host backends: ``paged_decoder(cache, block_table)`` returns ``step(query, key, value,
seq_lens, scale, out) -> out``, ``paged_attention`` bound to that cache and table for steps where
request r is query row r with one new token (everything derived from the cache prepared once);
``paged_decoder.PagedDecoder`` calls it when present (else ``paged_attention`` with
``query_start_loc = arange(B + 1)``).

The paged layout and its rules are owned by ``paged_cache.PagedCache``. Paged ops never
synchronise with the host on a GPU when ``num_decodes`` is given and every request is a decode
(the CUDA-graph case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .config import CodecConfig
from .encoded import Encoded
from .paged_cache import PagedCache

OPS = ("encode", "decode", "scores", "attention", "paged_write", "paged_attention")


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class Backend(Protocol):
    """What a backend module provides (module-level functions); a backend may serve a subset of
    ``OPS``, as its rows of ``CAPABILITIES`` declare.

    Dispatch hands callers the chosen module typed as this (``_dispatch.backend``), so every call
    into a backend is checked against it; ``tests/test_ops_contract.py`` checks each registered
    module's functions against it. Optional extras, looked up with ``hasattr``: ``attention_replay``,
    ``paged_attention_replay`` (a callable repeating a call just made; see ``_replay``),
    ``paged_decoder`` (see above).
    """

    __name__: str  # the module's

    def availability(self) -> Availability: ...

    def asarray(self, x: Any) -> Any: ...

    def encode(self, x: Any, cfg: CodecConfig, channels: Any) -> tuple[Any, Any]: ...

    def decode(self, enc: Encoded) -> Any: ...

    def scores(self, q: Any, keys: Encoded) -> Any: ...

    def attention(
        self, q: Any, k: Encoded, v: Encoded, scale: float, k_tail: Any, v_tail: Any
    ) -> Any: ...

    def paged_write(self, cache: PagedCache, key: Any, value: Any, slot_mapping: Any) -> tuple[Any, Any]: ...

    def paged_attention(
        self,
        cache: PagedCache,
        query: Any,
        key: Any,
        value: Any,
        block_table: Any,
        seq_lens: Any,
        query_start_loc: Any,
        scale: float,
        out: Any,
        num_decodes: int | None,
    ) -> Any: ...
