"""``PagedDecoder``: the ``paged_attention`` op bound to one cache and one block table, for decode steps.

A model layer calls the paged op once per decode step with the same cache and table. The public
op checks a host cache's values on every call (the raw slot map, the channel permutations, every
block the step reads); the decoder checks the cache and the table once, when built, and on each
call only the step's own arrays: their shapes and dtypes when they differ from the last call's,
the context lengths' values (host) always. Layout and rules: ``paged_cache``. Per call::

    query            [B, h_q, d]    float16/bfloat16/float32   query row r = request r (one new token)
    key, value       [B, H, d]                                 the new tokens
    seq_lens         [B] int                                   context lengths, the new token included
    out              [B, h_q, d]    float, optional            written in place

The arrays are read in place on every call, so records and raw rows written since are seen, and
``seq_lens`` may be the same buffer updated in place. Build a new decoder when a checked value
changes (the raw slot map, the channel permutations, the table) or any shape does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _interop, _validate, paged
from .paged_cache import PagedCache


class PagedDecoder:
    """``paged_attention`` for decode steps over one cache and one block table, checked once.

    Parameters
    ----------
    cache : PagedCache
        Checked here (values too, on the host); channel permutations set.
    block_table : array, [B, max_blocks], int
        Checked here: on the host each row's leading in-range blocks bound its ``seq_lens``.
    backend : str
        As ``paged_attention``'s; resolved per query dtype at the first call with it.

    Raises
    ------
    TypeError, ValueError
        As ``paged_attention`` would for the cache or the table.
    """

    def __init__(self, cache: PagedCache, block_table: Any, *, backend: str = "auto") -> None:
        paged._check_type(cache)
        paged._check_cache(cache)
        for cfg, channels, name in ((cache.k_config, cache.k_channels, "k_channels"),
                                    (cache.v_config, cache.v_channels, "v_channels")):
            if cfg.split and channels is None:
                raise ValueError(f"{name} is None: a paged_write (which picks the channels) must come first")
        self.num_requests, max_blocks = _validate.int_array(block_table, "block_table", 2)
        table = paged._host_ints(block_table)
        self._reach: np.ndarray | None = None
        if table is not None:
            # Tokens each row can hold: its blocks up to the first one outside the cache.
            inside = (table >= 0) & (table < cache.num_blocks)
            leading = np.where(inside.all(axis=1), max_blocks, np.argmin(inside, axis=1))
            self._reach = leading * cache.block_size
        self.cache, self.block_table, self.backend = cache, block_table, backend
        # The rows' smallest reach: one comparison per call when every row is within it.
        self._least_reach = (None if self._reach is None
                             else int(self._reach.min(initial=max_blocks * cache.block_size)))
        self._native: dict[str, tuple[Any, Any, Any]] = {}
        self._checked: tuple[Any, ...] | None = None  # the last call's argument layout that passed

    def _for(self, dtype: str) -> tuple[Any, Any, Any]:
        """(backend module, its bound step or None, the arguments of its ``paged_attention``)."""
        hit = self._native.get(dtype)
        if hit is None:
            module, native = paged._prepared(None, "paged_attention", self.cache, self.backend, dtype)
            table = module.asarray(self.block_table)
            if hasattr(module, "paged_decoder"):
                hit = (module, module.paged_decoder(native, table), None)
            else:
                qsl = module.asarray(np.arange(self.num_requests + 1, dtype=np.int32))
                hit = (module, None, (native, table, qsl))
            self._native[dtype] = hit
        return hit

    def __call__(self, query: Any, key: Any, value: Any, seq_lens: Any, *, scale: float,
                 out: Any = None) -> Any:
        """One decode step: attention of each request's new token over its context and itself.

        Returns
        -------
        array, [B, h_q, d]
            ``out`` (zeros like ``query`` when omitted, then filled).
        """
        if out is None:
            out = paged._zeros_like(query)
        layout = tuple((type(a), getattr(a, "shape", None), getattr(a, "dtype", None))
                       for a in (query, key, value, seq_lens, out))
        if layout != self._checked:
            self._check(query, key, value, seq_lens, out)
            self._checked = layout
        reach, least = self._reach, self._least_reach
        seq = paged._host_ints(seq_lens) if reach is not None and least is not None else None
        if (seq is not None and reach is not None and (seq.min() < 1 or seq.max() > least)
                and (np.any(seq < 1) or np.any(seq > reach))):
            raise ValueError(f"seq_lens {seq.tolist()} must lie in 1..the tokens each table row maps "
                             f"({reach.tolist()})")
        _validate.positive_finite(scale, "scale")
        module, step, args = self._for(_interop.dtype_name(query))
        if step is not None:
            return step(query, key, value, seq_lens, float(scale), out)
        native, table, qsl = args
        conv = [module.asarray(a) for a in (query, key, value, seq_lens, out)]
        result = module.paged_attention(native, *conv[:3], table, conv[3], qsl, float(scale), conv[4],
                                        self.num_requests)
        return out if result is conv[4] else _interop.like(result, out)

    def _check(self, query: Any, key: Any, value: Any, seq_lens: Any, out: Any) -> None:
        """Shapes and dtypes of a step's arrays (kept for the next calls with the same layout)."""
        b = self.num_requests
        t, h, d = paged._check_new(self.cache, key, value)
        q_shape = tuple(int(s) for s in getattr(query, "shape", ()))
        dtype = _interop.dtype_name(query) if hasattr(query, "dtype") else type(query).__name__
        if (t != b or len(q_shape) != 3 or q_shape[0] != b or q_shape[2] != d or q_shape[1] % h
                or dtype not in _validate.DTYPES):
            raise ValueError(f"query must be float [{b}, a multiple of {h} heads, {d}] and key/value "
                             f"[{b}, {h}, {d}] (one new token per request), got query {dtype} {q_shape}, "
                             f"key {(t, h, d)}")
        if _validate.int_array(seq_lens, "seq_lens", 1) != (b,):
            raise ValueError(f"seq_lens must have {b} entries (the table's rows), got "
                             f"{tuple(seq_lens.shape)}")
        _validate.output(out, q_shape, "out", dtypes=_validate.DTYPES)
