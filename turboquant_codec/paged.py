"""The public paged ops: validate, pick a backend, dispatch (layout and rules: ``paged_cache``).

Host inputs are checked completely before anything is written: every index a request would read or
write must lie inside the cache. Padding (vLLM's conventions): a negative slot is a padding token
(vLLM's PAD_SLOT_ID is -1), and block-table entries past a request's ``ceil(seq_lens[r] /
block_size)`` blocks are never read, whatever they hold (vLLM leaves zeros, or stale ids, there;
padding requests have ``seq_lens`` 0); an entry a request does read must be a block of the cache.
GPU inputs are checked by shape and dtype only on the decode path (``num_decodes`` given: reading
their values would synchronise): there the kernels skip out-of-range block ids, raw rows and slots
(a skipped context token is masked out) and clamp context lengths to the block table, so no call
reads or writes outside the cache; without ``num_decodes`` the backend synchronises anyway and the
values are checked as on the host.

A serving engine calls these ops every step of every layer on the same cache, so for torch and
CuPy GPU caches the cache's checks and the backend's views of its arrays are kept per cache
signature (data pointers, shapes, strides, dtypes, configurations, backend): a repeated call checks
and converts only the step's own arrays. Only cache arrays are kept (they live as long as the
engine); a step's activations never are, so nothing is held alive past its step.

Replays (``_replay`` says why they are sound): an all-decode GPU call with ``out`` and
``num_decodes`` given, whose arrays and scalars match an earlier checked call, runs the backend's
``paged_attention_replay`` of it: no check, no conversion, only its launches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dispatch, _interop, _replay, _validate
from . import backends as _registry
from ._ops import Backend
from .paged_cache import PagedCache

# cache signature -> (backend module, the cache as that backend's arrays); GPU torch / CuPy caches.
_PREPARED = _replay.Memo()
# call signature -> the backend's replay of that call (holds no array); GPU decode calls only.
_REPLAYS = _replay.Memo()


def _prepared(signature: tuple[Any, ...] | None, op: str, cache: PagedCache, backend: str,
              dtype: str) -> tuple[Backend, PagedCache]:
    """The backend for ``op`` and ``cache`` as its arrays, kept per signature (None: not kept)."""
    hit = _PREPARED.get(signature)
    if hit is None:
        module = _dispatch.backend(op, backend, cache.k_cache, (cache.k_config, cache.v_config), dtype)
        hit = module, cache.converted(module.asarray)
        if signature is not None:
            _PREPARED.put(signature, hit)
    return hit


def _signature(op: str, cache: PagedCache, backend: str, dtype: str) -> tuple[Any, ...] | None:
    keys = _replay.arrays_key((cache.k_cache, cache.v_cache, cache.k_channels, cache.v_channels,
                               cache.raw_k, cache.raw_v, cache.raw_slot_of_block))
    if keys is None:
        return None
    return (op, cache.k_config, cache.v_config, _registry.requested(backend), dtype, *keys)


def _host_ints(x: Any) -> np.ndarray | None:
    """``x``'s values when they can be read without a synchronisation (host data); else None."""
    return None if _interop.on_gpu(x) or _interop.is_fake(x) else _interop.to_numpy(x).astype(np.int64)


def _check_type(cache: Any) -> None:
    if not isinstance(cache, PagedCache):
        raise TypeError(f"cache must be a PagedCache, got {type(cache).__name__}")


def _check_cache(cache: PagedCache) -> None:
    if cache.k_config.d != cache.v_config.d:
        raise ValueError(f"k_config has d={cache.k_config.d} but v_config has d={cache.v_config.d}")
    lead = None
    for which, cfg in (("k", cache.k_config), ("v", cache.v_config)):
        records = getattr(cache, f"{which}_cache")
        shape = tuple(int(s) for s in getattr(records, "shape", ()))
        if _interop.dtype_name(records) != "uint8" or len(shape) != 4 or shape[3] != cfg.record_bytes:
            raise ValueError(
                f"{which}_cache must be uint8 [num_blocks, block_size, num_kv_heads, {cfg.record_bytes}] "
                f"for {cfg}, got {_interop.dtype_name(records)} {shape}"
            )
        if lead is not None and shape[:3] != lead:
            raise ValueError(f"k_cache blocks {lead} differ from v_cache blocks {shape[:3]}")
        lead = shape[:3]
        channels = getattr(cache, f"{which}_channels")
        if channels is not None:
            if not cfg.split:
                raise ValueError(f"{which}_channels were given but bits={cfg.bits:g} has no channel split")
            if tuple(channels.shape) != (cache.num_kv_heads, cfg.d):
                raise ValueError(f"{which}_channels must have shape {(cache.num_kv_heads, cfg.d)}, got "
                                 f"{tuple(channels.shape)}")
            _validate.permutation(channels, cfg.d)
    raw = (cache.raw_k, cache.raw_v, cache.raw_slot_of_block)
    if any(a is not None for a in raw) and not all(a is not None for a in raw):
        raise ValueError("raw_k, raw_v and raw_slot_of_block must be given together")
    if cache.has_raw:
        expected = (cache.block_size, cache.num_kv_heads, cache.head_dim)
        for name, pool in (("raw_k", cache.raw_k), ("raw_v", cache.raw_v)):
            shape = _validate.float_array(pool, name, 4) if 0 not in pool.shape else tuple(pool.shape)
            if len(shape) != 4 or tuple(shape[1:]) != expected:
                raise ValueError(f"{name} must be [num_raw_blocks, {expected[0]}, {expected[1]}, "
                                 f"{expected[2]}] to match the cache, got {tuple(shape)}")
        (n,) = _validate.int_array(cache.raw_slot_of_block, "raw_slot_of_block", 1)
        if n != cache.num_blocks:
            raise ValueError(f"raw_slot_of_block has {n} entries but the cache has {cache.num_blocks} blocks")
        rows = _host_ints(cache.raw_slot_of_block)
        if rows is not None and rows.size and (rows.max() >= cache.raw_k.shape[0] or rows.min() < -1):
            raise ValueError(f"raw_slot_of_block holds rows outside -1..{cache.raw_k.shape[0] - 1}")


def _check_new(cache: PagedCache, key: Any, value: Any) -> tuple[int, ...]:
    shape = _validate.float_array(key, "key", 3)
    if len(shape) != 3 or shape[1:] != (cache.num_kv_heads, cache.head_dim):
        raise ValueError(f"key must be [num_tokens, {cache.num_kv_heads}, {cache.head_dim}] to match the "
                         f"cache, got {shape}")
    if tuple(_validate.float_array(value, "value", 3)) != shape:
        raise ValueError(f"key has shape {shape} but value has {tuple(value.shape)}")
    return shape


def paged_write(cache: PagedCache, key: Any, value: Any, slot_mapping: Any, *,
                backend: str = "auto") -> PagedCache:
    """Encode new tokens into their slots of the paged cache (and their raw copies), in place.

    Parameters
    ----------
    cache : PagedCache
        Arrays of one library on one device; written in place.
    key, value : array, [T, H, d], float16/bfloat16/float32
    slot_mapping : array, [<= T], int
        ``block * block_size + offset`` per new token; negative entries are padding (skipped), and
        rows past its length are ignored.
    backend : str
        "auto" (by where the cache lives; ``TQ_BACKEND`` overrides) or a name from ``backends()``.

    Returns
    -------
    PagedCache
        ``cache`` with its channel permutations: those given, or chosen from this batch's
        non-padding tokens when they were None (keep them for every later call).

    Raises
    ------
    ValueError
        On a shape, dtype or (host inputs) a slot outside the cache, before anything is written.
    """
    _check_type(cache)
    dtype = _interop.dtype_name(key)

    # Channels still to be chosen make the call a one-off: nothing is kept for it.
    first = any(channels is None and cfg.split for channels, cfg in (
        (cache.k_channels, cache.k_config), (cache.v_channels, cache.v_config)))
    signature = None if first else _signature("paged_write", cache, backend, dtype)
    if signature not in _PREPARED:
        _check_cache(cache)
    t = _check_new(cache, key, value)[0]
    _check_slots(cache, t, slot_mapping)
    module, native = _prepared(signature, "paged_write", cache, backend, dtype)
    k_ch, v_ch = module.paged_write(native, *(module.asarray(a) for a in (key, value, slot_mapping)))
    if cache.k_channels is None and k_ch is not None:
        k_ch = _interop.like(k_ch, cache.k_cache)
    if cache.v_channels is None and v_ch is not None:
        v_ch = _interop.like(v_ch, cache.v_cache)
    return cache.with_channels(cache.k_channels if cache.k_channels is not None else k_ch,
                               cache.v_channels if cache.v_channels is not None else v_ch)


def check_write(cache: PagedCache, key: Any, value: Any, slot_mapping: Any) -> None:
    """Every check ``paged_write`` makes before writing (ValueError / TypeError naming the argument),
    for callers that must refuse a batch before acting on it (choosing channels from it)."""
    _check_type(cache)
    _check_cache(cache)
    _check_slots(cache, _check_new(cache, key, value)[0], slot_mapping)


def check_attention(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                    query_start_loc: Any, *, scale: float, out: Any, num_decodes: int | None) -> None:
    """Every check ``paged_attention`` makes before running (for the torch op's fake)."""
    _check_type(cache)
    _check_cache(cache)
    _check_step(cache, query, key, value, block_table, seq_lens, query_start_loc, scale, out, num_decodes)


def _check_slots(cache: PagedCache, t: int, slot_mapping: Any) -> None:
    """``slot_mapping`` [<= t] int; on the host, every non-negative slot inside the cache."""
    (n_slots,) = _validate.int_array(slot_mapping, "slot_mapping", 1)
    if n_slots > t:
        raise ValueError(f"slot_mapping has {n_slots} entries but only {t} new tokens are given")
    slots = _host_ints(slot_mapping)
    capacity = cache.num_blocks * cache.block_size
    if slots is not None and slots.size and slots.max() >= capacity:
        raise ValueError(f"slot_mapping holds slot {int(slots.max())} but the cache has {capacity} slots")


def _check_metadata(cache: PagedCache, t: int, block_table: Any, seq_lens: Any, query_start_loc: Any,
                    num_decodes: int | None) -> None:
    b, max_blocks = _validate.int_array(block_table, "block_table", 2)
    if (_validate.int_array(seq_lens, "seq_lens", 1) != (b,)
            or _validate.int_array(query_start_loc, "query_start_loc", 1) != (b + 1,)):
        raise ValueError(f"block_table has {b} rows, so seq_lens needs {b} entries (got "
                         f"{seq_lens.shape[0]}) and query_start_loc {b + 1} (got {query_start_loc.shape[0]})")
    if num_decodes is not None:
        num_decodes = _validate.integer(num_decodes, "num_decodes", 0, b)
        if num_decodes > t:
            raise ValueError(f"num_decodes={num_decodes} but only {t} query rows are given (decode request r "
                             f"reads row r)")
    starts, seq, table = (_host_ints(a) for a in (query_start_loc, seq_lens, block_table))
    if starts is None or seq is None or table is None:
        if num_decodes is not None or _interop.is_fake(block_table):
            return  # GPU decode step (no synchronisation; the kernels skip out-of-range entries) or tracing
        # Without num_decodes the backend reads query_start_loc on the host (a synchronisation
        # already): the values are checked as on the host.
        starts, seq, table = (_interop.to_numpy(a).astype(np.int64)
                              for a in (query_start_loc, seq_lens, block_table))
    q_lens = np.diff(starts)
    if starts[0] != 0 or np.any(q_lens < 0) or starts[-1] > t:
        raise ValueError(f"query_start_loc must rise from 0 to at most {t} (the new tokens), got "
                         f"{starts.tolist()}")
    if np.any(seq < q_lens):
        raise ValueError(f"seq_lens {seq.tolist()} must count each request's new tokens "
                         f"(query lengths {q_lens.tolist()})")
    if num_decodes is not None and np.any(q_lens[:num_decodes] > 1):
        raise ValueError(f"num_decodes={num_decodes} but query lengths are {q_lens[:num_decodes].tolist()}")
    needed = -(-seq // cache.block_size)
    if b and needed.max() > max_blocks:
        raise ValueError(f"seq_lens need {int(needed.max())} blocks but block_table has {max_blocks} columns")
    used = np.arange(max_blocks)[None, :] < needed[:, None]
    bad = used & ((table < 0) | (table >= cache.num_blocks))
    if bad.any():
        r, j = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"block_table[{r}, {j}] = {int(table[r, j])} lies outside the cache's "
                         f"{cache.num_blocks} blocks")


def paged_attention(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                    query_start_loc: Any, *, scale: float, out: Any = None, num_decodes: int | None = None,
                    backend: str = "auto") -> Any:
    """Causal attention of a batch mixing prefill and decode requests over the paged cache.

    Each request attends to its cached context (raw where its block has a raw row, else from the
    codes) and to its own new tokens (raw, from ``key``/``value``) in one softmax; query head ``i``
    reads KV head ``i // (h_q // H)``.

    Parameters
    ----------
    cache : PagedCache
        Channel permutations set (``paged_write`` returns them).
    query : array, [T, h_q, d], float16/bfloat16/float32
    key, value : array, [T, H, d]
        The new tokens; they need not have been written to the cache yet.
    block_table : array, [B, max_blocks], int
    seq_lens : array, [B], int
        Context lengths including the new tokens.
    query_start_loc : array, [B + 1], int
        Cumulative query lengths from 0; rows past ``query_start_loc[-1]`` are padding.
    scale : float
        Logit scale, usually ``d ** -0.5``.
    out : array, [T, h_q, d], float, optional
        Written in place (rows of padding tokens untouched); zeros like ``query`` when omitted.
    num_decodes : int, optional
        The first ``num_decodes`` requests have at most one new token each (0: a padding request
        of a CUDA-graph batch); no host synchronisation on a GPU when it covers every request.
    backend : str
        See ``paged_write``.

    Returns
    -------
    array, [T, h_q, d]
        ``out``.
    """
    _check_type(cache)
    dtype = _interop.dtype_name(query)
    signature = _signature("paged_attention", cache, backend, dtype)
    step = (query, key, value, block_table, seq_lens, query_start_loc, out)
    call = None if out is None else _call_signature(signature, step, scale, num_decodes)
    if _REPLAYS.replay(call):
        return out
    if out is None:
        out = _zeros_like(query)
    if signature not in _PREPARED:
        _check_cache(cache)
    _check_step(cache, query, key, value, block_table, seq_lens, query_start_loc, scale, out, num_decodes)
    module, native = _prepared(signature, "paged_attention", cache, backend, dtype)
    natives = [module.asarray(a) for a in (query, key, value, block_table, seq_lens, query_start_loc, out)]
    args = (native, *natives[:6], float(scale), natives[6], None if num_decodes is None else int(num_decodes))
    result = module.paged_attention(*args)
    if call is not None and hasattr(module, "paged_attention_replay"):
        _REPLAYS.keep(call, module.paged_attention_replay(*args))
    return out if result is natives[6] else _interop.like(result, out)


def _call_signature(signature: tuple[Any, ...] | None, step: tuple[Any, ...], scale: Any,
                    num_decodes: Any) -> tuple[Any, ...] | None:
    """What a decode call's launches depend on (``_replay``): the cache's ``signature``, the scalars
    and every step array's key; None unless the cache and every array are on the GPU."""
    if signature is None or type(scale) not in (float, int) or type(num_decodes) is not int:
        return None
    keys = _replay.arrays_key(step)
    return None if keys is None else (*signature, scale, num_decodes, *keys)


def _check_step(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                query_start_loc: Any, scale: float, out: Any, num_decodes: int | None) -> None:
    """The step's own arrays against the (checked) cache."""
    t, h, d = _check_new(cache, key, value)
    q_shape = _validate.float_array(query, "query", 3)
    if len(q_shape) != 3 or q_shape[0] != t or q_shape[2] != d or q_shape[1] % h:
        raise ValueError(f"query must be [{t}, a multiple of {h} heads, {d}], got {q_shape}")
    for cfg, channels, name in ((cache.k_config, cache.k_channels, "k_channels"),
                                (cache.v_config, cache.v_channels, "v_channels")):
        if cfg.split and channels is None:
            raise ValueError(f"{name} is None: a paged_write (which picks the channels) must come first")
    _validate.positive_finite(scale, "scale")
    _check_metadata(cache, t, block_table, seq_lens, query_start_loc, num_decodes)
    _validate.output(out, q_shape, "out", dtypes=_validate.DTYPES)


def _zeros_like(x: Any) -> Any:
    lib = _interop.library_of(x)
    if lib == "torch":
        return _interop._torch().zeros_like(x)
    if lib == "cupy":
        import cupy

        return cupy.zeros_like(x)
    if lib == "numba":
        from numba import cuda

        return cuda.to_device(np.zeros(x.shape, np.dtype(str(x.dtype))))
    return np.zeros_like(x)
