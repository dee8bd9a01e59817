"""Input rules of every public entry point (codec API, paged ops, torch wrapper, HF cache): each
failure is a TypeError (wrong kind of value) or a ValueError (right kind, wrong value) naming the
argument.

Scalars are checked by kind before any conversion, so nothing is silently truncated or wrapped:
integers are Python ints or anything with ``__index__`` (NumPy integers, 0-d integer tensors) but
never a bool; real numbers are ints or floats (NumPy's too) but never a bool or a string. Arrays
are checked by metadata (shape, dtype); values only where they live on the host, since reading GPU
memory would synchronise.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _interop

if TYPE_CHECKING:
    from .config import CodecConfig

# Input dtypes the codec accepts (bfloat16 through ml_dtypes on the host).
DTYPES = ("float16", "bfloat16", "float32")
# Seeds travel as uint64 in the byte header.
MAX_SEED = (1 << 64) - 1
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")


# ------------------------------------------------------------------------------------------ scalars
def _span(low: int | None, high: int | None) -> str:
    if high is None:
        return f">= {low}"
    if low is None:
        return f"<= {high}"
    return f"in {low}..{high}"


def integer(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int, within ``[low, high]`` (either bound optional).

    Raises
    ------
    TypeError
        A bool, a float (even 64.0), a string or anything else without ``__index__``.
    ValueError
        Outside the bounds.
    """
    if type(value) is int:  # the common case first: every public call makes a few of these
        v = value
    elif isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    else:
        v = _index(value, name)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an integer {_span(low, high)}, got {v}")
    return v


def _index(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def seed(value: Any, name: str = "seed") -> int:
    """A codec seed: an integer in ``[0, 2**64)`` (NumPy integers included), as a Python int."""
    if type(value) is int:
        v = value
    elif isinstance(value, bool | np.bool_) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer in [0, 2**64), got {type(value).__name__} {value!r}")
    else:
        v = operator.index(value)
    if not 0 <= v <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {v}")
    return v


def real(value: Any, name: str) -> float:
    """``value`` as a float: an int or a float (NumPy's included), never a bool or a string."""
    if type(value) is float or type(value) is int:  # the common case, without the ABC check
        return float(value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def positive_finite(value: Any, name: str) -> float:
    """A real number ``0 < value < inf`` (a logit scale), as a float."""
    v = real(value, name)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return v


# ------------------------------------------------------------------------------------------- arrays
def float_dtype(x: Any, name: str) -> None:
    """ValueError unless ``x`` has one of the codec's float dtypes (float16, bfloat16, float32)."""
    dtype = _interop.dtype_name(x)
    if dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {dtype}; supported: {', '.join(DTYPES)}")


def float_array(x: Any, name: str, min_ndim: int) -> tuple[int, ...]:
    """Check rank, emptiness and dtype of a float input; return its shape."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape})")
    float_dtype(x, name)
    return shape


def int_array(x: Any, name: str, ndim: int) -> tuple[int, ...]:
    """Shape of an integer index array of rank ``ndim``; TypeError for another dtype."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or _interop.dtype_name(x) not in INT_DTYPES:
        kind = _interop.dtype_name(x) if hasattr(x, "dtype") else type(x).__name__
        raise TypeError(f"{name} must be an integer array, got {kind}")
    shape = tuple(int(s) for s in x.shape)
    if len(shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {shape}")
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
    if _interop.on_gpu(channels) or _interop.is_fake(channels):
        return
    rows = np.sort(_interop.to_numpy(channels).reshape(-1, d).astype(np.int64), axis=1)
    if not np.array_equal(rows, np.broadcast_to(np.arange(d), rows.shape)):
        raise ValueError(f"channels must hold a permutation of 0..{d - 1} in every row")


def output(out: Any, shape: tuple[int, ...], name: str, *, dtypes: tuple[str, ...] = ("float32",),
           like: Any = None) -> None:
    """Raise unless ``out`` is an array of ``shape`` with a dtype in ``dtypes`` (and, when ``like`` is
    given, of ``like``'s library, on the GPU when ``like`` is)."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name} must be an array or tensor, got {type(out).__name__}")
    if like is not None:
        def where(x: Any) -> str:
            return f"{_interop.library_of(x)} array on the {'GPU' if _interop.on_gpu(x) else 'host'}"

        if where(out) != where(like):
            raise ValueError(f"{name} must be a {where(like)} like the query, got a {where(out)}")
    found = tuple(map(int, out.shape))
    if found != shape or _interop.dtype_name(out) not in dtypes:
        kind = dtypes[0] if len(dtypes) == 1 else "a float array"
        raise ValueError(f"{name} must be {kind} of shape {shape}, got {_interop.dtype_name(out)} {found}")


# -------------------------------------------------------------------- shapes of the codec's inputs
# Metadata only, so the torch ops' fake (meta) implementations apply the very same rules.
def record_array(records: Any, cfg: CodecConfig, name: str = "records") -> tuple[int, ...]:
    """Shape (..., n, record_bytes) and dtype uint8 of records for ``cfg``; returns the shape."""
    shape = tuple(records.shape)
    if len(shape) < 2 or shape[-1] != cfg.record_bytes:
        raise ValueError(f"{name} must have shape (..., n, {cfg.record_bytes}) for {cfg}, got {shape}")
    if _interop.dtype_name(records) != "uint8":
        raise ValueError(f"{name} must be uint8, got {_interop.dtype_name(records)}")
    return shape


def encoded_arrays(records: Any, channels: Any, cfg: CodecConfig) -> tuple[int, ...]:
    """Shape and dtype of an ``Encoded``'s arrays for ``cfg``; returns the records' shape."""
    shape = record_array(records, cfg)
    if cfg.split:
        if channels is None:
            raise ValueError(f"bits={cfg.bits:g} splits channels: a channel permutation is required")
        given_channels(channels, shape[:-2], cfg)
    elif channels is not None:
        raise ValueError(f"bits={cfg.bits:g} has no channel split: channels must be None")
    return shape


def given_channels(channels: Any, lead: tuple[int, ...], cfg: CodecConfig) -> None:
    """A channel permutation's shape ``(*lead, d)`` (values: ``permutation``)."""
    if not cfg.split:
        raise ValueError(f"channels were given but bits={cfg.bits:g} has no channel split")
    if tuple(channels.shape) != lead + (cfg.d,):
        raise ValueError(f"channels must have shape {lead + (cfg.d,)}, got {tuple(channels.shape)}")


def scores_inputs(q: Any, keys_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``q`` (..., m, d) against keys (..., n, d); returns ``q``'s shape."""
    shape = float_array(q, "q", 2)
    same_head_dim(shape, keys_shape, "q", "keys")
    same_lead(shape[:-2], keys_shape[:-2], "q", "keys")
    return shape


def attention_inputs(q: Any, k_shape: tuple[int, ...], v_shape: tuple[int, ...], k_tail: Any,
                     v_tail: Any) -> tuple[int, ...]:
    """``q`` (..., h_q, d) against keys and values (..., h_kv, n, d) and the optional tails
    (..., h_kv, t, d); returns ``q``'s shape."""
    for name, enc_shape in (("k_enc", k_shape), ("v_enc", v_shape)):
        if len(enc_shape) < 3:
            raise ValueError(f"{name} must have shape (..., h_kv, n, d), got {enc_shape}")
    shape = float_array(q, "q", 2)
    if k_shape != v_shape:
        raise ValueError(f"k_enc has shape {k_shape} but v_enc has {v_shape}")
    same_head_dim(shape, k_shape, "q", "k_enc")
    same_lead(shape[:-2], k_shape[:-3], "q", "k_enc")
    h_q, h_kv = shape[-2], k_shape[-3]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of KV heads ({h_kv})")
    if (k_tail is None) != (v_tail is None):
        raise ValueError("k_tail and v_tail must be given together")
    if k_tail is not None:
        for name, tail in (("k_tail", k_tail), ("v_tail", v_tail)):
            tail_shape = float_array(tail, name, 2)
            same_head_dim(shape, tail_shape, "q", name)
            same_lead(k_shape[:-2], tail_shape[:-2], "k_enc", name)
        if tuple(k_tail.shape) != tuple(v_tail.shape):
            raise ValueError(f"k_tail has shape {tuple(k_tail.shape)} but v_tail has {tuple(v_tail.shape)}")
    return shape
