"""Baseline KV compressors for comparison with TurboQuant, as fake-quantizers ``TurboQuantCache`` uses.

Each stores the dequantized vectors (B, H, n, d) float32 as its payload ("fake quantization": same
numbers the real format would give) and reports the honest bytes of the real format:

``KiviQuantizer`` (per-token uniform, KIVI-style asymmetric)
    Per vector: one float16 scale (max - min) and one float16 zero (min) over its ``d`` channels,
    then ``round((x - min) / scale * (2**b - 1))`` per channel. Half-integer bits: the head's ``d/2``
    outlier channels (largest mean square at calibration) get ``ceil(b)`` bits, the rest ``floor(b)``,
    under the same scale and zero. Honest bytes: ``d * b / 8 + 4``.
``UpstreamCache`` (upstream vLLM's shipped TurboQuant recipe, ``--kv-cache-dtype turboquant_*``)
    Keys: MSE codes at integer bits over the whole head (no outlier split) after the fixed
    Walsh-Hadamard rotation without signs (the codec with ``rotation="hadamard"``), a 2-byte norm
    (the codec's bfloat16; upstream's is float16), and norm correction on read (the decoded unit
    vector rescaled to norm 1 before the stored norm is applied). Values: per-token uniform codes
    with a float16 scale and zero (``KiviQuantizer`` at integer bits: round to nearest of ``2**b``
    levels between the vector's min and max).
    Every token is quantized as it is written and read back quantized, itself included, except in
    the first prefill chunk (upstream attends that chunk's raw K/V); the first and last
    ``boundary`` layers (2 upstream) keep raw K/V. Honest bytes per token and head are upstream's
    slot: ``ceil(d kb / 8) + 2`` for the key and ``ceil(d vb / 8) + 4`` for the value.
    (Rotating the fixed Hadamard inside the project's own cache is ``rotation="hadamard"``.)

Outlier channel choice is ``turboquant_codec``'s (``numpy_ref.select_channels``).

``DecodedCopyCache`` is the earlier contiguous ``TurboQuantCache``, kept as the reference the paged
cache is compared with: per layer ``[sinks | compressed | buffer]`` contiguous (B, H, n, *) tensors
plus a decoded float copy of the compressed part, and ``update`` returns the whole history
``[sinks | decoded | buffer]`` in the model dtype for any attention. Same flush rule, calibration,
seeds and codec calls as ``TurboQuantCache``, so the two read every token as the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from turboquant_codec.backends.numpy_ref import select_channels
from turboquant_codec.config import CodecConfig

from .hf_cache import (
    DEFAULT_FLUSH,
    DEFAULT_KEY_BITS,
    DEFAULT_ROTATION,
    DEFAULT_SEED_CANDIDATES,
    DEFAULT_SEED_CRITERION,
    DEFAULT_SINKS,
    DEFAULT_VALUE_BITS,
    KVQuantizer,
    LayerMemory,
    LengthProtocol,
    QuantizerFactory,
    TurboQuantizer,
    _model_shape,
    _nbytes,
    check_layout,
    check_states,
    turboquant_factory,
)


def _f16(x: Tensor) -> Tensor:
    """Round to float16 precision (what the stored scale/zero/norm would hold)."""
    return x.to(torch.float16).to(torch.float32)


class _Split:
    """Per-head outlier channel split fixed at calibration (half-integer bits only)."""

    def __init__(self, d: int, bits: float) -> None:
        self.d, self.bits = d, float(bits)
        self.split = self.bits != math.floor(self.bits)
        self.channels: Tensor | None = None  # (H, d) int64, outliers first

    def calibrate(self, x: Tensor) -> None:
        if self.split:
            b, h, n, d = x.shape
            pooled = x.transpose(0, 1).reshape(h, b * n, d).double().numpy()
            cfg = CodecConfig(d=self.d, bits=self.bits, mode="mse")
            self.channels = torch.from_numpy(select_channels(pooled, cfg).astype(np.int64))

    def groups(self) -> list[tuple[Tensor | None, int]]:
        """[(channel indices (H, g) or None for all, bits)] per group."""
        if not self.split:
            return [(None, int(self.bits))]
        if self.channels is None:
            raise RuntimeError("calibrate before encoding half-integer bits")
        half = self.d // 2
        hi, lo = math.ceil(self.bits), math.floor(self.bits)
        return [(self.channels[:, :half], hi), (self.channels[:, half:], lo)]

    def reset(self) -> None:
        self.channels = None

    def metadata_nbytes(self) -> int:
        # Stored as the codec stores its permutation: uint16 per channel per head.
        return 0 if self.channels is None else int(self.channels.numel() * 2)


def _gather(x: Tensor, idx: Tensor | None) -> Tensor:
    if idx is None:
        return x
    return torch.gather(x, -1, idx[None, :, None, :].expand(*x.shape[:-1], idx.shape[-1]))


def _scatter(out: Tensor, idx: Tensor | None, part: Tensor) -> Tensor:
    if idx is None:
        return part
    return out.scatter(-1, idx[None, :, None, :].expand(*part.shape[:-1], idx.shape[-1]), part)


class KiviQuantizer:
    """Per-token asymmetric uniform quantization (float16 scale + zero per vector).

    Parameters
    ----------
    d : int
        Head dimension.
    bits : float
        Bits per channel, integers or halves (then the outlier half gets one bit more).
    """

    def __init__(self, d: int, bits: float) -> None:
        self.split = _Split(d, bits)
        self.d, self.bits = d, float(bits)
        self.label = f"KIVI-style per-token uniform {self.bits:g}"

    def calibrate(self, x: Tensor) -> None:
        self.split.calibrate(x)

    def encode(self, x: Tensor) -> Tensor:
        xf = x.float()
        lo = _f16(xf.amin(-1, keepdim=True))
        scale = _f16(xf.amax(-1, keepdim=True) - lo).clamp_min(1e-8)
        out = torch.empty_like(xf)
        for idx, b in self.split.groups():
            levels = (1 << b) - 1
            part = _gather(xf, idx)
            q = torch.clamp(torch.round((part - lo) / scale * levels), 0, levels)
            out = _scatter(out, idx, lo + q / levels * scale)
        return out

    def decode(self, payload: Tensor) -> Tensor:
        return payload

    def bytes_per_vector(self) -> float:
        return self.d * self.bits / 8 + 4

    def stored_nbytes(self, payload: Tensor) -> int:
        return int(round(payload.shape[:-1].numel() * self.bytes_per_vector()))

    def metadata_nbytes(self) -> int:
        return self.split.metadata_nbytes()

    def reset(self) -> None:
        self.split.reset()


def kivi_factory(bits: float) -> QuantizerFactory:
    """``TurboQuantCache(quantizer=...)`` factory: KIVI-style keys and values at ``bits``."""

    def make(kind: str, layer_idx: int, head_dim: int) -> KVQuantizer:
        return KiviQuantizer(head_dim, bits)

    return make


# ----------------------------------------------------------------------------- decoded-copy cache
def _cat(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


class DecodedCopyLayer(LengthProtocol, CacheLayerMixin):
    """One layer of ``DecodedCopyCache``: contiguous sinks, records, decoded copy and buffer."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, layer_idx: int, num_kv_heads: int, head_dim: int, key_quantizer: KVQuantizer,
                 value_quantizer: KVQuantizer, flush_interval: int, sinks: int) -> None:
        super().__init__()
        self.layer_idx, self.num_kv_heads, self.head_dim = layer_idx, num_kv_heads, head_dim
        self.kq, self.vq = key_quantizer, value_quantizer
        self.flush_interval, self.sinks = flush_interval, sinks
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

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype, self.batch_size = key_states.device, key_states.dtype, key_states.shape[0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        """Append (B, H, q, d) states; return the whole history (B, H, L + q, d) in the model dtype."""
        check_states(self, key_states, value_states)
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
        parts_k = [t for t in (self.sink_k, self.dec_k, self.buf_k) if t is not None]
        parts_v = [t for t in (self.sink_v, self.dec_v, self.buf_v) if t is not None]
        keys, values = torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)
        self._flush()
        return keys, values

    def _flush(self) -> None:
        r = 0 if self.buf_k is None else self.buf_k.shape[-2]
        n = (r // self.flush_interval) * self.flush_interval
        if not n:
            return
        assert self.buf_k is not None and self.buf_v is not None
        old_k, old_v = self.buf_k[..., :n, :], self.buf_v[..., :n, :]
        if self.rec_k is None:
            self.kq.calibrate(old_k)
            self.vq.calibrate(old_v)
        pk, pv = self.kq.encode(old_k), self.vq.encode(old_v)
        self.rec_k, self.rec_v = _cat(self.rec_k, pk), _cat(self.rec_v, pv)
        self.dec_k = _cat(self.dec_k, self.kq.decode(pk).to(self.dtype))
        self.dec_v = _cat(self.dec_v, self.vq.decode(pv).to(self.dtype))
        self.buf_k = self.buf_k[..., n:, :].clone() if n < r else None
        self.buf_v = self.buf_v[..., n:, :].clone() if n < r else None

    def _select(self, fn: Callable[[Tensor], Tensor]) -> None:
        for name in ("sink_k", "sink_v", "buf_k", "buf_v", "rec_k", "rec_v", "dec_k", "dec_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        # Any held tensor gives the new batch (with sinks=0 there are no sink tensors).
        held = [t for t in (self.sink_k, self.buf_k, self.rec_k) if t is not None]
        if held:
            self.batch_size = held[0].shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("DecodedCopyCache cannot be cropped")

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def memory(self) -> LayerMemory:
        n = 0 if self.rec_k is None else self.rec_k.shape[-2] * self.rec_k.shape[0]
        records = 0
        if self.rec_k is not None and self.rec_v is not None:
            records = self.kq.stored_nbytes(self.rec_k) + self.vq.stored_nbytes(self.rec_v)
        raw = sum(_nbytes(t) for t in (self.sink_k, self.sink_v, self.buf_k, self.buf_v))
        decoded = _nbytes(self.dec_k) + _nbytes(self.dec_v)
        meta = self.kq.metadata_nbytes() + self.vq.metadata_nbytes()
        held = _nbytes(self.rec_k) + _nbytes(self.rec_v) + raw + decoded + meta
        batch = self.batch_size if self.is_initialized else 0
        return LayerMemory(records=records, metadata=meta, raw=raw, decoded=decoded, device=held,
                           compressed_tokens=n, raw_tokens=self.length * batch - n)


class DecodedCopyCache(Cache):
    """The earlier contiguous cache with a decoded copy (module docstring); any attention works.

    Parameters are ``TurboQuantCache``'s (without ``block_size``); full-attention models only.
    """

    def __init__(self, config: Any, *, key_bits: float = DEFAULT_KEY_BITS,
                 value_bits: float = DEFAULT_VALUE_BITS, key_mode: str = "mse",
                 value_mode: str = "mse", flush_interval: int = DEFAULT_FLUSH, sinks: int = DEFAULT_SINKS,
                 seed: int = 0, quantizer: QuantizerFactory | None = None, rotation: str = DEFAULT_ROTATION,
                 seed_candidates: int = DEFAULT_SEED_CANDIDATES,
                 seed_criterion: str = DEFAULT_SEED_CRITERION) -> None:
        flush_interval, sinks, _ = check_layout(flush_interval, sinks)
        num_layers, kv_heads, head_dim, types = _model_shape(config)
        if any(t != "full_attention" for t in types):
            raise ValueError("DecodedCopyCache supports full-attention layers only")
        make = quantizer or turboquant_factory(key_bits, value_bits, key_mode, value_mode, seed, rotation,
                                               seed_candidates, seed_criterion)
        super().__init__(layers=[
            DecodedCopyLayer(i, kv_heads, head_dim, make("key", i, head_dim), make("value", i, head_dim),
                             flush_interval, sinks)
            for i in range(num_layers)
        ])
        self.num_kv_heads, self.head_dim = kv_heads, head_dim

    def memory(self) -> LayerMemory:
        total = LayerMemory()
        for layer in self.layers:
            assert isinstance(layer, DecodedCopyLayer)
            total = total + layer.memory()
        return total


# ------------------------------------------------------------------------- upstream vLLM's recipe
class NormCorrectedKeys:
    """Upstream's keys: fixed-Hadamard MSE codes over the whole head, norm-corrected on read.

    Parameters
    ----------
    d : int
        Head dimension (a power of two).
    bits : int
        Code bits per channel (upstream ships 3 and 4).
    """

    def __init__(self, d: int, bits: int) -> None:
        self.inner = TurboQuantizer(d, float(bits), "mse", 0, rotation="hadamard")
        self.d, self.bits = d, int(bits)
        self.label = f"upstream keys {self.bits}"

    def calibrate(self, x: Tensor) -> None:
        pass  # integer bits: no channel split to fix

    def encode(self, x: Tensor) -> Tensor:
        return self.inner.encode(x)

    def decode(self, payload: Tensor) -> Tensor:
        y = self.inner.decode(payload)
        # The record's leading bfloat16 is the stored norm (``turboquant_codec.config``); the decoded
        # vector is norm * R^T c.
        norm = payload[..., :2].contiguous().view(torch.bfloat16).float()
        return y * (norm / y.norm(dim=-1, keepdim=True).clamp_min(1e-30))

    def bytes_per_vector(self) -> float:
        return math.ceil(self.d * self.bits / 8) + 2

    def stored_nbytes(self, payload: Tensor) -> int:
        return int(payload.shape[:-1].numel() * self.bytes_per_vector())

    def metadata_nbytes(self) -> int:
        return 0

    def reset(self) -> None:
        pass


class QuantizeOnWriteLayer(DecodedCopyLayer):
    """One compressed layer of ``UpstreamCache``: K/V quantized as written, read back quantized (no
    sinks, no recent buffer: the decoded-copy layer's parts that stay empty)."""

    def __init__(self, layer_idx: int, num_kv_heads: int, head_dim: int, key_quantizer: KVQuantizer,
                 value_quantizer: KVQuantizer) -> None:
        super().__init__(layer_idx, num_kv_heads, head_dim, key_quantizer, value_quantizer, 1, 0)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        """Store (B, H, q, d) states quantized; return the history read back quantized (the first
        chunk of a sequence reads its own raw states, as upstream's first prefill does)."""
        check_states(self, key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.length == 0
        pk, pv = self.kq.encode(key_states), self.vq.encode(value_states)
        self.rec_k, self.rec_v = _cat(self.rec_k, pk), _cat(self.rec_v, pv)
        self.dec_k = _cat(self.dec_k, self.kq.decode(pk).to(self.dtype))
        self.dec_v = _cat(self.dec_v, self.vq.decode(pv).to(self.dtype))
        self.length += key_states.shape[-2]
        if first:
            return key_states, value_states
        assert self.dec_k is not None and self.dec_v is not None
        return self.dec_k, self.dec_v


class UpstreamCache(Cache):
    """Upstream vLLM's shipped TurboQuant KV cache, emulated (module docstring); any attention works.

    Parameters
    ----------
    config : PretrainedConfig
    key_bits, value_bits : int
        Upstream presets: ``turboquant_3bit_nc`` = (3, 3), ``turboquant_k3v4_nc`` = (3, 4),
        ``turboquant_4bit_nc`` = (4, 4).
    boundary : int
        First and last layers kept raw (upstream: 2, at most half the layers).
    """

    def __init__(self, config: Any, *, key_bits: int, value_bits: int, boundary: int = 2) -> None:
        from transformers.cache_utils import DynamicLayer

        num_layers, kv_heads, head_dim, types = _model_shape(config)
        if any(t != "full_attention" for t in types):
            raise ValueError("UpstreamCache supports full-attention layers only")
        keep = min(int(boundary), num_layers // 2)
        self.raw_layers = sorted({*range(keep), *range(num_layers - keep, num_layers)})
        super().__init__(layers=[
            DynamicLayer() if i in self.raw_layers else
            QuantizeOnWriteLayer(i, kv_heads, head_dim, NormCorrectedKeys(head_dim, key_bits),
                                 KiviQuantizer(head_dim, value_bits))
            for i in range(num_layers)
        ])
        self.num_kv_heads, self.head_dim = kv_heads, head_dim

    def memory(self) -> LayerMemory:
        """Bytes of the compressed layers (the raw boundary layers are not included)."""
        total = LayerMemory()
        for layer in self.layers:
            if isinstance(layer, QuantizeOnWriteLayer):
                total = total + layer.memory()
        return total
