"""The seeded random transforms every backend shares, defined once on the host.

Each channel group owns two matrices, both functions of (seed, group index, group dimension) only:

- ``rotation``, of the configuration's kind (``CodecConfig.rotation``), always a dense ``g x g``
  orthogonal matrix, so every backend and kernel serves every kind through the same tables:

  - ``"haar"``: Haar-random (QR of a Gaussian matrix with the signs of ``R``'s diagonal fixed, which
    makes the factorisation unique). Unlike randomized Hadamard transforms, it keeps the paper's MSE
    guarantee on every input kind (one-hot and constant inputs included; figures in
    ``docs/design-measurements.md``);
  - ``"hadamard2"``: ``H D2 H D1`` with ``H`` the normalised Sylvester Walsh-Hadamard matrix and
    ``D1``, ``D2`` diagonal random signs from (seed, group);
  - ``"hadamard"``: ``H`` alone (no signs; the same for every seed), upstream vLLM's rotation.

  The Hadamard kinds are delivered as dense matrices too: encode and decode cost ``g^2``
  multiply-adds per vector whatever the kind (no ``g log g`` fast path), none per key in attention,
  where the query is rotated once.
- ``projection``: the QJL matrix ``S`` with i.i.d. N(0, 1) entries, ``g x g``.

Randomness comes from NumPy's Philox counter-based bit generator, whose raw stream NumPy guarantees
stable across versions and machines; Gaussians are made from it by Box-Muller in float64 here, so
the same seed gives the same matrices everywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import _validate
from .codebooks import codec_codebook
from .config import CodecConfig

# Distinguishes the streams of different purposes under one seed.
_ROTATION_TAG = 1
_PROJECTION_TAG = 2
_SIGNS_TAG = 3


def stream_seed(seed: int, stream: int) -> int:
    """Derive the seed of one stream (a layer, a K or V cache) from a base seed.

    Parameters
    ----------
    seed, stream : int
        Non-negative integers.

    Returns
    -------
    int
        A 64-bit seed; distinct streams give unrelated transforms.
    """
    seed = _validate.seed(seed)
    stream = _validate.integer(stream, "stream", 0, 2**32 - 1)
    key = np.random.Philox(key=np.array([seed, stream | (3 << 56)], dtype=np.uint64))
    return int(key.random_raw())


def gaussian(seed: int, tag: int, group: int, rows: int, cols: int) -> np.ndarray:
    """Portable i.i.d. N(0, 1) float64 matrix of shape (rows, cols) for one (seed, purpose, group)."""
    stream = (tag << 56) | (group << 32) | cols
    gen = np.random.Philox(key=np.array([seed, stream], dtype=np.uint64))
    count = rows * cols + (rows * cols) % 2
    raw = gen.random_raw(count)
    uniform = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    u1, u2 = uniform[0::2], uniform[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    pairs = np.stack([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
    return pairs.reshape(-1)[: rows * cols].reshape(rows, cols)


# Rotations depend on (seed, group, dim) only: configs differing in bits or mode share them.
@functools.lru_cache(maxsize=256)
def haar_rotation(seed: int, group: int, dim: int) -> np.ndarray:
    """Haar-random orthogonal (dim, dim) float64 matrix (cached; treat as read-only)."""
    q, r = np.linalg.qr(gaussian(seed, _ROTATION_TAG, group, dim, dim))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def sylvester_hadamard(dim: int) -> np.ndarray:
    """Normalised Walsh-Hadamard matrix (dim, dim) float64 (Sylvester's construction; symmetric).

    Raises
    ------
    ValueError
        When ``dim`` is not a power of two.
    """
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two dimension, got {dim}")
    h = np.ones((1, 1))
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(dim)


def random_signs(seed: int, group: int, dim: int, rounds: int) -> np.ndarray:
    """(rounds, dim) float64 of +-1, portable (Philox raw bits), one row per Hadamard round."""
    gen = np.random.Philox(key=np.array([seed, (_SIGNS_TAG << 56) | (group << 32) | dim], dtype=np.uint64))
    bits = gen.random_raw(rounds * dim) & np.uint64(1)
    return np.where(bits.reshape(rounds, dim) == 1, -1.0, 1.0)


@functools.lru_cache(maxsize=256)
def rotation_matrix(kind: str, seed: int, group: int, dim: int) -> np.ndarray:
    """The (dim, dim) float64 rotation of one group (cached; treat as read-only).

    Parameters
    ----------
    kind : {"haar", "hadamard2", "hadamard"}
        See the module docstring.
    seed, group, dim : int
        The configuration's seed, the group index and its dimension.
    """
    if kind == "haar":
        return haar_rotation(seed, group, dim)
    h = sylvester_hadamard(dim)
    if kind == "hadamard":
        return h
    if kind == "hadamard2":
        signs = random_signs(seed, group, dim, 2)
        # y = H D2 H D1 x: sign flips folded into the columns of each round.
        return (h * signs[1]) @ (h * signs[0])
    raise ValueError(f"unknown rotation kind {kind!r}")


@dataclass(frozen=True)
class GroupTables:
    """Host float64 tables of one channel group.

    Attributes
    ----------
    rotation : ndarray (g, g)
        Rotated coordinates are ``rotation @ x``.
    projection : ndarray (g, g) or None
        QJL matrix (prod mode only).
    centroids : ndarray (2**code_bits,)
    boundaries : ndarray (2**code_bits - 1,)
    qjl_scale : float
        ``sqrt(pi/2) / g``: the QJL dequantization constant.
    """

    rotation: np.ndarray
    projection: np.ndarray | None
    centroids: np.ndarray
    boundaries: np.ndarray
    qjl_scale: float


@functools.lru_cache(maxsize=64)
def tables(cfg: CodecConfig) -> tuple[GroupTables, ...]:
    """The tables of every group of ``cfg``, built once per configuration."""
    out = []
    for g in cfg.groups:
        book = codec_codebook(g.code_bits, g.dim)
        out.append(
            GroupTables(
                rotation=rotation_matrix(cfg.rotation, cfg.seed, g.index, g.dim),
                projection=gaussian(cfg.seed, _PROJECTION_TAG, g.index, g.dim, g.dim)
                if g.qjl
                else None,
                centroids=book.centroids,
                boundaries=book.boundaries,
                qjl_scale=float(np.sqrt(np.pi / 2) / g.dim),
            )
        )
    return tuple(out)
