"""Input checks of the public API: each failure is a ValueError naming what was wrong."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _interop
from .config import DTYPES


def float_array(x: Any, name: str, min_ndim: int) -> tuple[int, ...]:
    """Check rank, emptiness and dtype of a float input; return its shape."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}")
    shape = tuple(map(int, x.shape))
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape})")
    dtype = _interop.dtype_name(x)
    if dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {dtype}; supported: {', '.join(DTYPES)}")
    return shape


def finite(x: Any, name: str) -> None:
    """Raise when ``x`` holds NaN or Inf, saying how many and where the first one is."""
    lib = _interop.library_of(x)
    if lib == "torch":
        torch = _interop._torch()
        bad = ~torch.isfinite(x)
        count = int(bad.sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0]) if count else ()
    elif lib == "cupy":
        import cupy

        bad = ~cupy.isfinite(x)
        count = int(bad.sum())
        first = tuple(int(i[0]) for i in cupy.nonzero(bad)) if count else ()
    else:
        host = _interop.to_numpy(x)
        bad = ~np.isfinite(host.astype(np.float32))
        count = int(bad.sum())
        first = tuple(int(i[0]) for i in np.nonzero(bad)) if count else ()
    if count:
        raise ValueError(f"{name} holds {count} NaN/Inf values; the first at index {first}")


def same_head_dim(a: tuple[int, ...], b: tuple[int, ...], a_name: str, b_name: str) -> None:
    if a[-1] != b[-1]:
        raise ValueError(f"{a_name} has last dimension {a[-1]} but {b_name} has {b[-1]}")


def same_lead(a: tuple[int, ...], b: tuple[int, ...], a_name: str, b_name: str) -> None:
    if a != b:
        raise ValueError(f"leading dimensions differ: {a_name} {a} vs {b_name} {b}")


def permutation(channels: Any, d: int) -> None:
    """Raise unless every row of host ``channels`` (..., d) is a permutation of 0..d-1.

    GPU arrays are not copied back to check (that would synchronise); their records are still
    self-consistent, only the outlier choice would be wrong.
    """
    if _interop.on_gpu(channels):
        return
    rows = np.sort(_interop.to_numpy(channels).reshape(-1, d).astype(np.int64), axis=1)
    if not np.array_equal(rows, np.broadcast_to(np.arange(d), rows.shape)):
        raise ValueError(f"channels must hold a permutation of 0..{d - 1} in every row")


def output(out: Any, shape: tuple[int, ...], like: Any, name: str) -> None:
    """Raise unless ``out`` is a float32 array of ``shape`` in the library of ``like`` (on the GPU
    when ``like`` is)."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name} must be an array or tensor, got {type(out).__name__}")
    def where(x: Any) -> str:
        return f"{_interop.library_of(x)} array on the {'GPU' if _interop.on_gpu(x) else 'host'}"

    if where(out) != where(like):
        raise ValueError(f"{name} must be a {where(like)} like the query, got a {where(out)}")
    if tuple(map(int, out.shape)) != shape or _interop.dtype_name(out) != "float32":
        raise ValueError(f"{name} must be float32 of shape {shape}, got {_interop.dtype_name(out)} "
                         f"{tuple(map(int, out.shape))}")
