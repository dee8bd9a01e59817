"""Seeded data makers shared by the tests, the asv benchmarks and the GPU benchmark scripts."""

from __future__ import annotations

import numpy as np

# Relative step between neighbouring bfloat16 norms (at most 2**-7): norms a backend computes in
# float32 may round to the neighbour of the reference's float64 norm.
NORM_RTOL = 2.0**-7


def unit_vectors(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniformly random unit vectors along the last axis, float64."""
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def kv_like(rng: np.random.Generator, shape: tuple[int, ...], outliers: int = 4) -> np.ndarray:
    """Gaussian vectors with a few channels 8x larger, as real keys have; float32."""
    x = rng.standard_normal(shape)
    idx = rng.choice(shape[-1], outliers, replace=False)
    x[..., idx] *= 8.0
    return x.astype(np.float32)
