"""Baseline KV compressors for comparison with TurboQuant, as fake-quantizers ``TurboQuantCache`` uses.

Each stores the dequantized vectors (B, H, n, d) float32 as its payload ("fake quantization": same
numbers the real format would give) and reports the honest bytes of the real format:

``KiviQuantizer`` (per-token uniform, KIVI-style asymmetric)
    Per vector: one float16 scale (max - min) and one float16 zero (min) over its ``d`` channels,
    then ``round((x - min) / scale * (2**b - 1))`` per channel. Half-integer bits: the head's ``d/2``
    outlier channels (largest mean square at calibration) get ``ceil(b)`` bits, the rest ``floor(b)``,
    under the same scale and zero. Honest bytes: ``d * b / 8 + 4``.
``HadamardQuantizer`` (upstream vLLM's MSE-only recipe)
    Per channel group: float16 norm, normalised Walsh-Hadamard rotation with no random signs, the
    project's Lloyd-Max codebook for the group's dimension, no QJL. Same groups (outlier split),
    same record size as TurboQuant mse (``CodecConfig(...).record_bytes``): only the rotation differs.

Outlier channel choice and codebooks are ``turboquant_codec``'s (``numpy_ref.select_channels``,
``lloyd_max``): the baselines differ from TurboQuant in the transform, not in those choices.

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
from turboquant_codec.codebooks import lloyd_max
from turboquant_codec.config import CodecConfig

from .hf_cache import (
    DEFAULT_FLUSH,
    DEFAULT_ROTATION,
    DEFAULT_SEED_CANDIDATES,
    DEFAULT_SINKS,
    KVQuantizer,
    LayerMemory,
    LengthProtocol,
    QuantizerFactory,
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


def hadamard(n: int) -> Tensor:
    """Normalised Sylvester Hadamard matrix (n, n), ``n`` a power of two."""
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two group size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


class HadamardQuantizer:
    """MSE-only Hadamard recipe: norm, fixed Walsh-Hadamard rotation, Lloyd-Max codes; no signs, no QJL.

    Parameters
    ----------
    d : int
        Head dimension.
    bits : float
        As TurboQuant mse (halves: the outlier half one bit finer).
    """

    def __init__(self, d: int, bits: float) -> None:
        self.split = _Split(d, bits)
        self.config = CodecConfig(d=d, bits=bits, mode="mse")
        self.d, self.bits = d, float(bits)
        self.label = f"Hadamard mse {self.bits:g}"

    def calibrate(self, x: Tensor) -> None:
        self.split.calibrate(x)

    def encode(self, x: Tensor) -> Tensor:
        xf = x.double()
        out = torch.empty_like(xf)
        for idx, b in self.split.groups():
            part = _gather(xf, idx)
            g = part.shape[-1]
            book = lloyd_max(b, g)
            centroids = torch.from_numpy(book.centroids)
            boundaries = torch.from_numpy(book.boundaries)
            h = hadamard(g)
            norm = part.norm(dim=-1, keepdim=True)
            y = (part / norm.clamp_min(1e-30)) @ h.T
            y_hat = centroids[torch.bucketize(y, boundaries)]
            out = _scatter(out, idx, (y_hat @ h) * _f16(norm.float()).double())
        return out.float()

    def decode(self, payload: Tensor) -> Tensor:
        return payload

    def stored_nbytes(self, payload: Tensor) -> int:
        return int(payload.shape[:-1].numel() * self.config.record_bytes)

    def metadata_nbytes(self) -> int:
        return self.split.metadata_nbytes()

    def reset(self) -> None:
        self.split.reset()


def kivi_factory(bits: float) -> QuantizerFactory:
    """``TurboQuantCache(quantizer=...)`` factory: KIVI-style keys and values at ``bits``."""

    def make(kind: str, layer_idx: int, head_dim: int) -> KVQuantizer:
        return KiviQuantizer(head_dim, bits)

    return make


def hadamard_factory(bits: float) -> QuantizerFactory:
    """``TurboQuantCache(quantizer=...)`` factory: Hadamard-MSE keys and values at ``bits``."""

    def make(kind: str, layer_idx: int, head_dim: int) -> KVQuantizer:
        return HadamardQuantizer(head_dim, bits)

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

    def __init__(self, config: Any, *, key_bits: float = 3.5, value_bits: float = 3.5, key_mode: str = "mse",
                 value_mode: str = "mse", flush_interval: int = DEFAULT_FLUSH, sinks: int = DEFAULT_SINKS,
                 seed: int = 0, quantizer: QuantizerFactory | None = None, rotation: str = DEFAULT_ROTATION,
                 seed_candidates: int = DEFAULT_SEED_CANDIDATES) -> None:
        flush_interval, sinks, _ = check_layout(flush_interval, sinks)
        num_layers, kv_heads, head_dim, types = _model_shape(config)
        if any(t != "full_attention" for t in types):
            raise ValueError("DecodedCopyCache supports full-attention layers only")
        make = quantizer or turboquant_factory(key_bits, value_bits, key_mode, value_mode, seed, rotation,
                                               seed_candidates)
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
