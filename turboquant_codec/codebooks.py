"""Lloyd-Max scalar codebooks for the coordinates of a randomly rotated unit vector.

After a uniformly random rotation, each coordinate ``x`` of a unit vector in ``R^d`` has the density
``f(x) ∝ (1 - x^2)^((d - 3) / 2)`` on ``[-1, 1]`` (paper, Lemma 1), which tends to ``N(0, 1/d)``. We
solve the Lloyd-Max conditions (boundaries at midpoints, centroids at conditional means) for that exact
density, in the scaled variable ``u = x * sqrt(d)`` so one grid serves every dimension; ``d=None``
gives the Gaussian limit.

A codebook of ``b`` bits is ``2**b`` increasing centroids in unit-vector coordinates (so already
divided by ``sqrt(d)``) and the ``2**b - 1`` decision boundaries between them; code ``i`` means
centroid ``i``.

``lloyd_max`` is the exact solution. The codec uses ``codec_codebook``: the same centroids rounded
to float16 in the scaled variable (boundaries back at the midpoints), so tensor-core kernels hold
every centroid exactly in a float16 operand (times a power of two) and agree with the float64
reference to float32 rounding with one product per code instead of a hi + lo pair. The rounding
moves a centroid by at most 2**-11 of itself and, at the codec's 1-4 code bits, the distortion by
under 3e-6 of itself (``tests/test_quality.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Grid points over the scaled support: enough that centroids agree with quadrature to ~1e-7.
_GRID = 1 << 16
# Beyond 12 standard deviations the Gaussian-limit density is below 1e-31: nothing to resolve there.
_SUPPORT = 12.0
_MAX_ITERATIONS = 2000
_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Codebook:
    """Centroids and decision boundaries of one scalar quantizer, in unit-vector coordinates.

    Attributes
    ----------
    bits : int
        Code width; ``2**bits`` centroids.
    d : int or None
        Dimension whose coordinate density was used; None for the Gaussian limit.
    centroids : ndarray, shape (2**bits,), float64
    boundaries : ndarray, shape (2**bits - 1,), float64
    distortion : float
        ``d * E[(x - Q(x))^2]``: the expected squared error per unit vector (paper's ``D_mse``).
    """

    bits: int
    d: int | None
    centroids: np.ndarray
    boundaries: np.ndarray
    distortion: float


def _scaled_density(d: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Grid ``u`` and normalised density of ``u = x * sqrt(d)`` (Gaussian when ``d`` is None)."""
    half = _SUPPORT if d is None else min(_SUPPORT, float(np.sqrt(d)))
    u = np.linspace(-half, half, _GRID)
    if d is None:
        log_f = -0.5 * u * u
    else:
        inside = np.clip(1.0 - u * u / d, 1e-300, None)
        log_f = 0.5 * (d - 3) * np.log(inside)
    f = np.exp(log_f - log_f.max())
    f /= np.trapezoid(f, u)
    return u, f


def _cumulative(u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Running trapezoid integral of ``y`` over ``u``, starting at 0."""
    steps = 0.5 * (y[1:] + y[:-1]) * np.diff(u)
    return np.concatenate([[0.0], np.cumsum(steps)])


@functools.cache
def lloyd_max(bits: int, d: int | None = None) -> Codebook:
    """Solve the Lloyd-Max quantizer for the rotated-coordinate density.

    Parameters
    ----------
    bits : int
        Code width, 1 to 8.
    d : int or None
        Vector dimension (>= 3); None for the Gaussian limit ``N(0, 1/d)`` in scaled units.

    Returns
    -------
    Codebook
        Cached: each (bits, d) is solved once per process.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 1..8, got {bits}")
    if d is not None and d < 3:
        raise ValueError(f"codebook dimension must be >= 3 (or None for Gaussian), got {d}")
    u, f = _scaled_density(d)
    mass = _cumulative(u, f)
    moment = _cumulative(u, u * f)
    levels = 1 << bits
    # Start from equal-mass cells: Lloyd iteration from there converges to the symmetric optimum.
    edges = np.interp(np.linspace(0, 1, levels + 1)[1:-1], mass, u)
    for _ in range(_MAX_ITERATIONS):
        cuts = np.concatenate([[u[0]], edges, [u[-1]]])
        m = np.diff(np.interp(cuts, u, mass))
        mom = np.diff(np.interp(cuts, u, moment))
        centroids = mom / np.maximum(m, 1e-300)
        new_edges = 0.5 * (centroids[1:] + centroids[:-1])
        done = np.max(np.abs(new_edges - edges)) < _TOLERANCE
        edges = new_edges
        if done:
            break
    cuts = np.concatenate([[u[0]], edges, [u[-1]]])
    m = np.diff(np.interp(cuts, u, mass))
    centroids = np.diff(np.interp(cuts, u, moment)) / np.maximum(m, 1e-300)
    return _codebook(bits, d, u, f, centroids, edges)


@functools.cache
def codec_codebook(bits: int, d: int | None = None) -> Codebook:
    """The codebook every backend encodes and decodes with: ``lloyd_max(bits, d)`` with its scaled
    centroids ``u = x * sqrt(d)`` rounded to float16 and the boundaries at their midpoints.

    Parameters
    ----------
    bits, d
        As for ``lloyd_max``.

    Returns
    -------
    Codebook
        Cached; ``centroids * sqrt(d)`` are float16 values.
    """
    exact = lloyd_max(bits, d)
    scale = 1.0 if d is None else float(np.sqrt(d))
    centroids = (exact.centroids * scale).astype(np.float16).astype(np.float64)
    if np.any(np.diff(centroids) <= 0):
        raise ValueError(f"{bits}-bit codebook for d={d} has centroids closer than float16 resolution")
    u, f = _scaled_density(d)
    return _codebook(bits, d, u, f, centroids, 0.5 * (centroids[1:] + centroids[:-1]))


def _codebook(bits: int, d: int | None, u: np.ndarray, f: np.ndarray, centroids: np.ndarray,
              edges: np.ndarray) -> Codebook:
    """Codebook in unit-vector coordinates from scaled centroids and edges, with its distortion
    under the density ``f`` on the grid ``u``."""
    code = np.clip(np.searchsorted(edges, u), 0, (1 << bits) - 1)
    distortion = float(np.trapezoid((u - centroids[code]) ** 2 * f, u))
    scale = 1.0 if d is None else 1.0 / np.sqrt(d)
    return Codebook(
        bits=bits,
        d=d,
        centroids=centroids * scale,
        boundaries=edges * scale,
        distortion=distortion,
    )
