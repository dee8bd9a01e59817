"""The public API: validate, pick a backend, dispatch. No math lives here (see ``_ops``)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import _interop, _validate
from . import backends as _registry
from .capabilities import CAPABILITIES
from .config import CodecConfig
from .encoded import Encoded


def _backend(
    op: str, name: str, ref: Any, configs: tuple[CodecConfig, ...], dtype: str | None
) -> ModuleType:
    """Resolve ``name`` for data like ``ref``, check the capability table, load the module."""
    resolved = _registry.resolve(name, _interop.on_gpu(ref))
    support = CAPABILITIES[op].get(resolved)
    if support is None:
        raise ValueError(f"backend {resolved!r} does not implement {op}")
    for cfg in configs:
        refusal = support.refusal(dtype, cfg.d, cfg.bits, cfg.mode)
        if refusal:
            raise ValueError(f"backend {resolved!r} does not support {refusal} for {op}")
    return _registry.load(resolved)


def encode(
    x: Any,
    *,
    bits: float = 3.5,
    mode: str = "mse",
    seed: int = 0,
    channels: Any = None,
    backend: str = "auto",
    check_finite: bool = True,
) -> Encoded:
    """Compress vectors with TurboQuant.

    Parameters
    ----------
    x : array, shape (..., n, d), float16, bfloat16 or float32
        NumPy array, torch tensor, CuPy array or Numba device array.
    bits : float
        Nominal code bits per channel: mode "mse" 1-4, "prod" 2-5, in steps of 0.5. Half-integer
        bits quantize the ``d/2`` outlier channels of each stream one bit finer than the rest.
    mode : {"mse", "prod"}
        "mse": TurboQuant_mse (lowest reconstruction error; the default, as MSE keys measured best
        for attention). "prod": TurboQuant_prod, ``bits - 1`` code bits plus a 1-bit QJL sketch of
        the residual, for unbiased inner products.
    seed : int
        Seeds the rotations and QJL projections; use a different seed per layer/stream
        (``transforms.stream_seed``).
    channels : array, shape (..., d), optional
        Channel permutation (outlier channels first) of an earlier ``Encoded`` of the same streams,
        to keep the outlier choice fixed across calls. By default each stream picks its ``d/2``
        channels of largest mean square in ``x``.
    backend : str
        "auto" (by where ``x`` lives; ``TQ_BACKEND`` overrides), or a name from ``backends()``.
    check_finite : bool
        Reject NaN/Inf (one extra pass over ``x``; a synchronisation on GPU).

    Returns
    -------
    Encoded
        Records (..., n, record_bytes) in the library and on the device of ``x``.
    """
    shape = _validate.float_array(x, "x", 2)
    cfg = CodecConfig(d=shape[-1], bits=bits, mode=mode, seed=seed)
    if channels is not None:
        if not cfg.split:
            raise ValueError(f"channels were given but bits={cfg.bits:g} has no channel split")
        if tuple(channels.shape) != shape[:-2] + (cfg.d,):
            raise ValueError(
                f"channels must have shape {shape[:-2] + (cfg.d,)}, got {tuple(channels.shape)}"
            )
        _validate.permutation(channels, cfg.d)
    if check_finite:
        _validate.finite(x, "x")
    module = _backend("encode", backend, x, (cfg,), _interop.dtype_name(x))
    native_channels = None if channels is None else module.asarray(channels)
    records, out_channels = module.encode(module.asarray(x), cfg, native_channels)
    return Encoded(
        records=_interop.like(records, x),
        channels=None if out_channels is None else _interop.like(out_channels, x),
        config=cfg,
    )


def _native(module: ModuleType, enc: Encoded) -> Encoded:
    channels = None if enc.channels is None else module.asarray(enc.channels)
    return Encoded(records=module.asarray(enc.records), channels=channels, config=enc.config)


def decode(enc: Encoded, *, backend: str = "auto") -> Any:
    """Reconstruct vectors.

    Parameters
    ----------
    enc : Encoded
        Shape (..., n, d).
    backend : str
        See ``encode``.

    Returns
    -------
    array, shape (..., n, d), float32
        In the library and on the device of ``enc.records``.
    """
    if not isinstance(enc, Encoded):
        raise TypeError(f"decode expects an Encoded, got {type(enc).__name__}")
    module = _backend("decode", backend, enc.records, (enc.config,), None)
    return _interop.like(module.decode(_native(module, enc)), enc.records)


def scores(q: Any, keys: Encoded, *, backend: str = "auto") -> Any:
    """Estimated inner products of queries with encoded keys, computed from the codes.

    Each query is rotated once; keys are never fully decoded. With mode "prod" keys the estimate is
    unbiased.

    Parameters
    ----------
    q : array, shape (..., m, d)
    keys : Encoded, shape (..., n, d)
        Same leading dimensions as ``q``.

    Returns
    -------
    array, shape (..., m, n), float32
    """
    if not isinstance(keys, Encoded):
        raise TypeError(f"scores expects Encoded keys, got {type(keys).__name__}")
    shape = _validate.float_array(q, "q", 2)
    _validate.same_head_dim(shape, keys.shape, "q", "keys")
    _validate.same_lead(shape[:-2], keys.shape[:-2], "q", "keys")
    _validate.finite(q, "q")
    module = _backend("scores", backend, keys.records, (keys.config,), _interop.dtype_name(q))
    return _interop.like(module.scores(module.asarray(q), _native(module, keys)), keys.records)


def attention(
    q: Any,
    k_enc: Encoded,
    v_enc: Encoded,
    *,
    scale: float,
    k_tail: Any = None,
    v_tail: Any = None,
    backend: str = "auto",
    check_finite: bool = True,
) -> Any:
    """Decode attention over compressed keys/values plus optional uncompressed tail tokens.

    ``softmax(scale * q k^T) v`` in one softmax over the ``n`` compressed and ``t`` tail tokens;
    query head ``i`` reads KV head ``i // (h_q // h_kv)`` (grouped-query attention).

    Parameters
    ----------
    q : array, shape (..., h_q, d)
    k_enc, v_enc : Encoded, shape (..., h_kv, n, d)
        ``h_q`` must be a multiple of ``h_kv``.
    scale : float
        Logit scale, usually ``d ** -0.5``.
    k_tail, v_tail : array, shape (..., h_kv, t, d), optional
        Uncompressed most recent tokens; both or neither.
    backend : str
        See ``encode``.
    check_finite : bool
        Reject a query holding NaN/Inf (a synchronisation on GPU: pass False in a decode loop or
        under CUDA-graph capture, where a non-finite query then gives non-finite outputs).

    Returns
    -------
    array, shape (..., h_q, d), float32
    """
    for name, enc in (("k_enc", k_enc), ("v_enc", v_enc)):
        if not isinstance(enc, Encoded):
            raise TypeError(f"{name} must be an Encoded, got {type(enc).__name__}")
        if len(enc.shape) < 3:
            raise ValueError(f"{name} must have shape (..., h_kv, n, d), got {enc.shape}")
    shape = _validate.float_array(q, "q", 2)
    if k_enc.shape != v_enc.shape:
        raise ValueError(f"k_enc has shape {k_enc.shape} but v_enc has {v_enc.shape}")
    _validate.same_head_dim(shape, k_enc.shape, "q", "k_enc")
    _validate.same_lead(shape[:-2], k_enc.shape[:-3], "q", "k_enc")
    h_q, h_kv = shape[-2], k_enc.shape[-3]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of KV heads ({h_kv})")
    if (k_tail is None) != (v_tail is None):
        raise ValueError("k_tail and v_tail must be given together")
    if k_tail is not None:
        for name, tail in (("k_tail", k_tail), ("v_tail", v_tail)):
            tail_shape = _validate.float_array(tail, name, 2)
            _validate.same_head_dim(shape, tail_shape, "q", name)
            _validate.same_lead(k_enc.shape[:-2], tail_shape[:-2], "k_enc", name)
        if tuple(k_tail.shape) != tuple(v_tail.shape):
            raise ValueError(f"k_tail has shape {tuple(k_tail.shape)} but v_tail has {tuple(v_tail.shape)}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if check_finite:
        _validate.finite(q, "q")
    module = _backend(
        "attention", backend, k_enc.records, (k_enc.config, v_enc.config), _interop.dtype_name(q)
    )
    tails = [None if t is None else module.asarray(t) for t in (k_tail, v_tail)]
    out = module.attention(
        module.asarray(q), _native(module, k_enc), _native(module, v_enc), float(scale), *tails
    )
    return _interop.like(out, q)
