"""A Hugging Face transformers ``Cache`` that keeps the KV history as TurboQuant records.

Layout of one layer's cache (``B`` batch, ``H`` KV heads, ``d`` head dim, positions in order)::

    positions [0, S)          sinks     raw (B, H, S, d), model dtype        kept uncompressed
    positions [S, S + n)      compressed payload (B, H, n, R) per K and V    uint8 TurboQuant records
                                         (+ decoded copy (B, H, n, d) when keep_decoded)
    positions [S + n, L)      buffer    raw (B, H, r, d), model dtype        the recent tokens, r < F
                                                                             between updates

Each ``update`` appends the new tokens (filling the sinks first), hands the model the whole history
``[sinks | decode(compressed) | buffer]`` (the current step always sees its own tokens and the buffer
uncompressed), then, once the buffer holds ``F = flush_interval`` tokens or more, compresses its oldest
whole multiples of ``F`` in one batch. Tokens are compressed exactly once (no re-quantization). The
first flush of a layer fixes each head's outlier channels (half-integer bits) from the tokens it
compresses, pooled over the batch; sinks never enter that choice.

Seeds: layer ``i`` encodes keys with ``stream_seed(seed, 2 i)`` and values with
``stream_seed(seed, 2 i + 1)``. The codec maths is ``turboquant_torch.ops`` / ``turboquant_codec``;
this module only moves tensors. Other compressors (``baselines``) plug in through ``quantizer=``.

Decoded copy: with ``keep_decoded=True`` (the default) each flush is decoded once and the float copy is
kept beside the records, so a step costs one decode of the new batch; with ``False`` every step decodes
the whole compressed history (measured on this CPU with the NumPy reference: ~28 ms per K or V stream
of 2048 tokens, i.e. ~1.7 s per forward of SmolLM2's 30 layers, more than the model forward itself,
versus ~0.1 s per flush). ``memory()`` reports the records and raw buffers (the stored form) and the
decoded working copy separately.

Defaults (measured, TurboQuant mse/mse, 2048 GPL-3 tokens in 128-token chunks, dPPL / KL / top-1):
flush 128, sinks 4: 3.5 bits +0.65% / 0.0053 / 96.0%, 2.5 bits +2.07% / 0.0209 / 91.5%;
flush 128, sinks 16: +0.61% / 0.0047 / 96.4%, +1.78% / 0.0199 / 91.9%;
flush 256, sinks 4: +0.63% / 0.0041 / 96.7%, +1.54% / 0.0195 / 91.8% (chosen);
flush 256, sinks 16: 2.5 bits +2.31% / 0.0209 / 92.5%. MSE keys beat QJL keys (docs/eval-smollm2.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from turboquant_codec.transforms import stream_seed

from .ops import DTYPES, TorchCodec
from .ops import decode as _decode
from .ops import encode as _encode

DEFAULT_BITS = 3.5
DEFAULT_MODE = "mse"
# Tuned on SmolLM2-135M / GPL-3 (docs/eval-smollm2.md): flush 256 beat 128; more sinks did not pay.
DEFAULT_FLUSH = 256
DEFAULT_SINKS = 4


class KVQuantizer(Protocol):
    """What a layer needs from the compressor of its keys or of its values.

    ``payload`` is whatever the compressor stores per vector, shaped (B, H, n, *).
    """

    label: str

    def calibrate(self, x: Tensor) -> None:
        """Fix per-head state (outlier channels) from the first flushed tokens ``x`` (B, H, n, d)."""

    def encode(self, x: Tensor) -> Tensor:
        """Payload (B, H, n, *) of ``x`` (B, H, n, d)."""
        ...

    def decode(self, payload: Tensor) -> Tensor:
        """Vectors (B, H, n, d) float32 of a payload."""
        ...

    def stored_nbytes(self, payload: Tensor) -> int:
        """Honest bytes the payload stands for (records, scales, norms)."""
        ...

    def metadata_nbytes(self) -> int:
        """Bytes of fixed per-layer state (outlier channel permutations), counted once."""
        ...

    def reset(self) -> None:
        """Forget calibration (a new sequence recalibrates on its first flush)."""


QuantizerFactory = Callable[[str, int, int], KVQuantizer]
"""``factory(kind, layer_idx, head_dim)`` with ``kind`` in {"key", "value"}."""


class TurboQuantizer:
    """TurboQuant records through ``TorchCodec``: per-head outlier channels, fixed at calibration.

    Parameters
    ----------
    d : int
        Head dimension.
    bits : float
        Nominal code bits per channel (mse 1-4, prod 2-5, halves allowed).
    mode : {"mse", "prod"}
    seed : int
        This stream's seed (``stream_seed``).
    """

    def __init__(self, d: int, bits: float, mode: str, seed: int) -> None:
        self.codec = TorchCodec(d, bits, mode, seed, check_finite=False)
        self.label = f"TurboQuant {mode} {self.codec.bits:g}"

    def _channels(self, batch: int) -> Tensor | None:
        # Channels are per head (H, d); the op wants one permutation per (batch, head) stream.
        ch = self.codec.channels
        return None if ch is None else ch.expand(batch, -1, -1).contiguous()

    def calibrate(self, x: Tensor) -> None:
        if self.codec.split:
            b, h, n, d = x.shape
            # Pool the batch: one choice per head, shared by every sequence in the batch.
            self.codec.calibrate(x.transpose(0, 1).reshape(h, b * n, d))

    def encode(self, x: Tensor) -> Tensor:
        c = self.codec
        records, _ = _encode(x, bits=c.bits, mode=c.mode, seed=c.seed, channels=self._channels(x.shape[0]),
                             check_finite=False)
        return records

    def decode(self, payload: Tensor) -> Tensor:
        c = self.codec
        return _decode(payload, self._channels(payload.shape[0]), d=c.d, bits=c.bits, mode=c.mode,
                       seed=c.seed)

    def stored_nbytes(self, payload: Tensor) -> int:
        return int(payload.numel() * payload.element_size())

    def metadata_nbytes(self) -> int:
        ch = self.codec.channels
        return 0 if ch is None else int(ch.numel() * ch.element_size())

    def reset(self) -> None:
        self.codec.channels = None
        self.codec._on_device = {}


def turboquant_factory(
    key_bits: float = DEFAULT_BITS, value_bits: float = DEFAULT_BITS, key_mode: str = DEFAULT_MODE,
    value_mode: str = DEFAULT_MODE, seed: int = 0,
) -> QuantizerFactory:
    """Factory of per-layer TurboQuant quantizers with per-layer, per-K/V seeds."""

    def make(kind: str, layer_idx: int, head_dim: int) -> KVQuantizer:
        if kind == "key":
            return TurboQuantizer(head_dim, key_bits, key_mode, stream_seed(seed, 2 * layer_idx))
        return TurboQuantizer(head_dim, value_bits, value_mode, stream_seed(seed, 2 * layer_idx + 1))

    return make


@dataclass
class LayerMemory:
    """Bytes held by one layer (or summed over layers).

    Attributes
    ----------
    records : int
        Compressed payload of K and V (honest bytes: norms, scales, padding included).
    metadata : int
        Fixed per-layer state (outlier channel permutations).
    raw : int
        Uncompressed sinks and recent buffer, at the model dtype.
    decoded : int
        The decoded working copy (``keep_decoded``); not part of the stored form.
    compressed_tokens, raw_tokens : int
        Tokens (per sequence) in each part.
    """

    records: int = 0
    metadata: int = 0
    raw: int = 0
    decoded: int = 0
    compressed_tokens: int = 0
    raw_tokens: int = 0

    @property
    def stored(self) -> int:
        """Records + metadata + raw buffers: what the cache must keep."""
        return self.records + self.metadata + self.raw

    def __add__(self, other: LayerMemory) -> LayerMemory:
        return LayerMemory(self.records + other.records, self.metadata + other.metadata,
                           self.raw + other.raw, self.decoded + other.decoded,
                           self.compressed_tokens + other.compressed_tokens,
                           self.raw_tokens + other.raw_tokens)


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else int(t.numel() * t.element_size())


def _cat(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


class TurboQuantLayer(CacheLayerMixin):
    """One attention layer's compressed KV (layout in the module docstring).

    Parameters
    ----------
    layer_idx, num_kv_heads, head_dim : int
        What this layer expects; ``update`` refuses other shapes.
    key_quantizer, value_quantizer : KVQuantizer
    flush_interval : int
        ``F``: the buffer is compressed, in whole batches of ``F`` tokens, once it holds ``F`` or more.
    sinks : int
        Leading tokens kept uncompressed.
    keep_decoded : bool
        Keep a decoded float copy of the compressed tokens (decode each batch once).
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, layer_idx: int, num_kv_heads: int, head_dim: int, key_quantizer: KVQuantizer,
                 value_quantizer: KVQuantizer, flush_interval: int = DEFAULT_FLUSH,
                 sinks: int = DEFAULT_SINKS, keep_decoded: bool = True) -> None:
        super().__init__()
        self.layer_idx, self.num_kv_heads, self.head_dim = layer_idx, num_kv_heads, head_dim
        self.kq, self.vq = key_quantizer, value_quantizer
        self.flush_interval, self.sinks, self.keep_decoded = flush_interval, sinks, keep_decoded
        self._clear()

    def _clear(self) -> None:
        self.sink_k: Tensor | None = None
        self.sink_v: Tensor | None = None
        self.buf_k: Tensor | None = None
        self.buf_v: Tensor | None = None
        self.rec_k: Tensor | None = None
        self.rec_v: Tensor | None = None
        self.dec_k: Tensor | None = None
        self.dec_v: Tensor | None = None
        self.length = 0
        self.is_initialized = False
        self.keys = self.values = None

    # ------------------------------------------------------------------------------------ checks
    def _check(self, k: Tensor, v: Tensor) -> None:
        for name, t in (("key_states", k), ("value_states", v)):
            if t.dtype not in DTYPES:
                raise ValueError(f"{name} have dtype {t.dtype}; TurboQuantCache supports "
                                 f"{', '.join(str(d) for d in DTYPES)}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be (batch, kv_heads, tokens, head_dim), got {tuple(t.shape)}")
            if t.shape[1] != self.num_kv_heads:
                raise ValueError(f"layer {self.layer_idx}: the model gives {t.shape[1]} KV heads but the "
                                 f"cache was built for num_kv_heads={self.num_kv_heads}")
            if t.shape[3] != self.head_dim:
                raise ValueError(f"layer {self.layer_idx}: the model gives head_dim={t.shape[3]} but the "
                                 f"cache was built for head_dim={self.head_dim}")
        if k.shape != v.shape:
            raise ValueError(f"key_states {tuple(k.shape)} and value_states {tuple(v.shape)} differ")
        if self.is_initialized:
            if k.dtype != self.dtype:
                raise ValueError(f"layer {self.layer_idx}: new states have dtype {k.dtype} but the cache "
                                 f"holds {self.dtype} (a cache cannot be reused across models)")
            if k.shape[0] != self.batch_size:
                raise ValueError(f"layer {self.layer_idx}: new states have batch {k.shape[0]} but the cache "
                                 f"holds batch {self.batch_size}")

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype, self.batch_size = key_states.device, key_states.dtype, key_states.shape[0]
        self.is_initialized = True

    # ------------------------------------------------------------------------------------ update
    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        """Append (B, H, q, d) states; return the whole history (B, H, L + q, d) in the model dtype."""
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states, value_states
        n_sink = self.sink_k.shape[-2] if self.sink_k is not None else 0
        take = min(max(self.sinks - n_sink, 0), k.shape[-2])
        if take:
            self.sink_k = _cat(self.sink_k, k[..., :take, :])
            self.sink_v = _cat(self.sink_v, v[..., :take, :])
            k, v = k[..., take:, :], v[..., take:, :]
        if k.shape[-2]:
            self.buf_k, self.buf_v = _cat(self.buf_k, k), _cat(self.buf_v, v)
        self.length += key_states.shape[-2]
        keys = self._history(self.sink_k, self.rec_k, self.dec_k, self.buf_k, self.kq)
        values = self._history(self.sink_v, self.rec_v, self.dec_v, self.buf_v, self.vq)
        self._flush()
        return keys, values

    def _history(self, sink: Tensor | None, rec: Tensor | None, dec: Tensor | None, buf: Tensor | None,
                 q: KVQuantizer) -> Tensor:
        if rec is not None and dec is None:
            dec = q.decode(rec).to(self.dtype)
        parts = [t for t in (sink, dec, buf) if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def _flush(self) -> None:
        """Compress the buffer's oldest whole multiples of ``flush_interval`` tokens."""
        r = 0 if self.buf_k is None else self.buf_k.shape[-2]
        n = (r // self.flush_interval) * self.flush_interval
        if not n:
            return
        assert self.buf_k is not None and self.buf_v is not None
        old_k, old_v = self.buf_k[..., :n, :], self.buf_v[..., :n, :]
        if self.rec_k is None:  # first flush: fix the outlier channels of every head
            self.kq.calibrate(old_k)
            self.vq.calibrate(old_v)
        pk, pv = self.kq.encode(old_k), self.vq.encode(old_v)
        self.rec_k, self.rec_v = _cat(self.rec_k, pk), _cat(self.rec_v, pv)
        if self.keep_decoded:
            self.dec_k = _cat(self.dec_k, self.kq.decode(pk).to(self.dtype))
            self.dec_v = _cat(self.dec_v, self.vq.decode(pv).to(self.dtype))
        # Clone the remainder so the flushed prefix's storage is released.
        self.buf_k = self.buf_k[..., n:, :].clone() if n < r else None
        self.buf_v = self.buf_v[..., n:, :].clone() if n < r else None

    # ---------------------------------------------------------------------------- Cache protocol
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()
        self.kq.reset()
        self.vq.reset()

    def _select(self, fn: Callable[[Tensor], Tensor]) -> None:
        for name in ("sink_k", "sink_v", "buf_k", "buf_v", "rec_k", "rec_v", "dec_k", "dec_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if self.sink_k is not None:
            self.batch_size = self.sink_k.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("TurboQuantCache cannot be cropped: compressed tokens cannot be restored exactly")

    def offload(self) -> None:  # records are small; offloading is not supported
        pass

    def prefetch(self) -> None:
        pass

    # ------------------------------------------------------------------------------------ memory
    def memory(self) -> LayerMemory:
        """Bytes held by this layer (see ``LayerMemory``)."""
        n = 0 if self.rec_k is None else self.rec_k.shape[-2]
        records = 0
        if self.rec_k is not None and self.rec_v is not None:
            records = self.kq.stored_nbytes(self.rec_k) + self.vq.stored_nbytes(self.rec_v)
        raw_parts = (self.sink_k, self.sink_v, self.buf_k, self.buf_v)
        return LayerMemory(
            records=records,
            metadata=self.kq.metadata_nbytes() + self.vq.metadata_nbytes(),
            raw=sum(_nbytes(t) for t in raw_parts),
            decoded=_nbytes(self.dec_k) + _nbytes(self.dec_v),
            compressed_tokens=n,
            raw_tokens=self.length - n,
        )


def _model_shape(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config; full attention only."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layer_types = getattr(text, "layer_types", None) or []
    others = sorted({t for t in layer_types if t != "full_attention"})
    if others:
        raise ValueError(f"TurboQuantCache supports full-attention layers only; the config has {others}")
    return int(text.num_hidden_layers), int(kv_heads), int(head_dim)


class TurboQuantCache(Cache):
    """transformers ``Cache`` holding the KV history as TurboQuant records (plus raw sinks and buffer).

    Parameters
    ----------
    config : PretrainedConfig
        The model's config: fixes the number of layers, KV heads and head dim the cache accepts.
    key_bits, value_bits : float
        Nominal code bits per channel (halves quantize half the channels, the outliers, a bit finer).
    key_mode, value_mode : {"mse", "prod"}
        TurboQuant_mse or TurboQuant_prod (QJL). MSE keys measured better for attention.
    flush_interval : int
        Recent tokens kept raw before being compressed together (``F`` in the module docstring).
    sinks : int
        Leading tokens kept uncompressed (attention sinks).
    seed : int
        Base seed; layer ``i`` uses ``stream_seed(seed, 2 i)`` (K) and ``stream_seed(seed, 2 i + 1)`` (V).
    keep_decoded : bool
        Keep each flushed batch's decoded copy (fast steps) instead of decoding the history every step.
    quantizer : callable, optional
        ``quantizer(kind, layer_idx, head_dim) -> KVQuantizer`` replacing TurboQuant (``baselines``);
        the bits/mode/seed arguments are then unused.

    Examples
    --------
    >>> cache = TurboQuantCache(model.config)                       # doctest: +SKIP
    >>> model.generate(**inputs, cache=cache, max_new_tokens=32)     # doctest: +SKIP
    >>> cache.memory().stored                                        # doctest: +SKIP
    """

    def __init__(self, config: Any, *, key_bits: float = DEFAULT_BITS, value_bits: float = DEFAULT_BITS,
                 key_mode: str = DEFAULT_MODE, value_mode: str = DEFAULT_MODE,
                 flush_interval: int = DEFAULT_FLUSH, sinks: int = DEFAULT_SINKS, seed: int = 0,
                 keep_decoded: bool = True, quantizer: QuantizerFactory | None = None) -> None:
        if int(flush_interval) < 1:
            raise ValueError(f"flush_interval must be >= 1, got {flush_interval}")
        if int(sinks) < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        num_layers, kv_heads, head_dim = _model_shape(config)
        make = quantizer or turboquant_factory(key_bits, value_bits, key_mode, value_mode, seed)
        layers = [
            TurboQuantLayer(i, kv_heads, head_dim, make("key", i, head_dim), make("value", i, head_dim),
                            int(flush_interval), int(sinks), keep_decoded)
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.num_kv_heads, self.head_dim = kv_heads, head_dim

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"the model asks for layer {layer_idx} but the cache was built for "
                             f"{len(self.layers)} layers (a cache cannot be reused across models)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory(self) -> LayerMemory:
        """Bytes held by all layers (``LayerMemory``; token counts summed over layers)."""
        total = LayerMemory()
        for layer in self.layers:
            total = total + layer.memory()
        return total
