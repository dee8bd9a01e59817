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

  The Hadamard kinds are delivered as dense matrices too (the GPU kernels read them so), and also
  as their sign rows (``GroupTables.signs``): the host applies them as sign flips and fast
  Walsh-Hadamard transforms, ``g log2 g`` additions per vector per round instead of ``g^2``
  multiply-adds (``rotate``; which path runs: ``tuning.HostTuning.rotation_path``).
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
from . import tuning as _tuning
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
    signs = hadamard_signs(kind, seed, group, dim)
    if signs is None:
        return haar_rotation(seed, group, dim)
    h = sylvester_hadamard(dim)
    # y = H D_k ... H D_1 x: each round's sign flips folded into the columns of its H.
    matrix = h * signs[0]
    for row in signs[1:]:
        matrix = (h * row) @ matrix
    return matrix


def hadamard_signs(kind: str, seed: int, group: int, dim: int) -> np.ndarray | None:
    """The sign rows of a Hadamard kind, one per round in the order applied; None for ``"haar"``.

    Returns
    -------
    ndarray (rounds, dim) float64 of +-1, or None
        ``rotation_matrix(kind, ...) @ x`` equals ``H (signs[-1] * ... H (signs[0] * x))`` with
        ``H = sylvester_hadamard(dim)``: one row of ones for ``"hadamard"``, ``random_signs(..., 2)``
        for ``"hadamard2"``.
    """
    if kind == "haar":
        return None
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two dimension, got {dim}")
    if kind == "hadamard":
        return np.ones((1, dim))
    if kind == "hadamard2":
        return random_signs(seed, group, dim, 2)
    raise ValueError(f"unknown rotation kind {kind!r}")


def fwht(x: np.ndarray) -> np.ndarray:
    """Normalised Walsh-Hadamard transform of the last axis, in NumPy: ``x @ sylvester_hadamard(g)``.

    Parameters
    ----------
    x : ndarray (..., g) float
        ``g`` a power of two.

    Returns
    -------
    ndarray (..., g) float64
        A new array; ``log2 g`` butterfly stages over whole-array slices.
    """
    out = np.array(x, dtype=np.float64, copy=True)
    lead, g = out.shape[:-1], out.shape[-1]
    flat = out.reshape(-1, g)
    h = 1
    while h < g:
        pairs = flat.reshape(flat.shape[0], g // (2 * h), 2, h)
        low = pairs[:, :, 0, :].copy()
        pairs[:, :, 0, :] += pairs[:, :, 1, :]
        low -= pairs[:, :, 1, :]
        pairs[:, :, 1, :] = low
        h *= 2
    return (flat * (1.0 / np.sqrt(g))).reshape(*lead, g)


@functools.cache
def _numba_rotate() -> object | None:
    """``numba_cpu.fwht_rotate`` when Numba imports, else None (checked once per process)."""
    from .backends import availability, load

    return load("numba_cpu").fwht_rotate if availability("numba_cpu") else None


def rotation_path(kind: str) -> str:
    """Which path ``rotate`` takes for ``kind`` under the tuning in force: "dense", "numpy" or "numba".

    Haar is always dense. For the Hadamard kinds, ``HostTuning.rotation_path`` "auto" takes the
    Numba transform when Numba imports and the dense product otherwise: NumPy's butterflies, one
    pass over the array per stage, are slower than the BLAS product at g <= 128
    (``benchmarks/RESULTS-rotation.md``).
    """
    path = _tuning.current().host.rotation_path
    if kind == "haar" or path == "dense":
        return "dense"
    if path == "auto":
        return "numba" if _numba_rotate() is not None else "dense"
    if path == "numba" and _numba_rotate() is None:
        raise RuntimeError("HostTuning.rotation_path='numba' but the numba_cpu backend is not available")
    return path


def rotate(x: np.ndarray, t: GroupTables, inverse: bool = False) -> np.ndarray:
    """One group's rotation applied to the rows of ``x`` on the host, by the path ``rotation_path`` picks.

    Parameters
    ----------
    x : ndarray (..., g) float
        Vectors of one group (any strides).
    t : GroupTables
        The group's tables (``rotation``, and ``signs`` for the Hadamard kinds).
    inverse : bool
        False: ``R x`` per row (``x @ R.T``); True: ``R^T x`` per row (``x @ R``).

    Returns
    -------
    ndarray (..., g) float64
        Equal to the dense product within float64 rounding (a few ulps of the norm).
    """
    path = "dense" if t.signs is None else rotation_path("hadamard")
    if path == "dense":
        return np.asarray(x, dtype=np.float64) @ (t.rotation if inverse else t.rotation.T)
    assert t.signs is not None
    if path == "numba":
        fast = _numba_rotate()
        assert fast is not None
        g = x.shape[-1]
        flat = np.asarray(x, dtype=np.float64).reshape(-1, g)
        return fast(flat, t.signs, inverse).reshape(x.shape)  # type: ignore[operator]
    # NumPy: R = H D_k ... H D_1, so R x flips then transforms per round; R^T x the reverse.
    y = np.asarray(x, dtype=np.float64)
    if not inverse:
        for row in t.signs:
            y = fwht(y * row)
    else:
        for row in t.signs[::-1]:
            y = fwht(y) * row
    return y


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
    signs : ndarray (rounds, g) or None
        The Hadamard kinds' sign rows (``hadamard_signs``), which with fast transforms make
        ``rotation``; None for Haar.
    """

    rotation: np.ndarray
    projection: np.ndarray | None
    centroids: np.ndarray
    boundaries: np.ndarray
    qjl_scale: float
    signs: np.ndarray | None = None


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
                signs=hadamard_signs(cfg.rotation, cfg.seed, g.index, g.dim),
            )
        )
    return tuple(out)
