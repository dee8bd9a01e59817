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
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from turboquant_codec.backends.numpy_ref import select_channels
from turboquant_codec.codebooks import lloyd_max
from turboquant_codec.config import CodecConfig

from .hf_cache import KVQuantizer, QuantizerFactory


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
