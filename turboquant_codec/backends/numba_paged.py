"""Paged-cache ops of the numba_cuda backend: readable reference kernels for the GPU, no speed target.

The paged layout and its rules are ``paged_cache.PagedCache``'s; this module owns the launches.

Layout owned here
-----------------
Kernels take Numba arrays *with their strides* (``_arr``): ``k_cache``/``v_cache`` are usually views
of one packed K+V tensor, so they are indexed ``[block, offset, head, byte]`` and never reshaped.
They are launched through Numba's own launch path on the caller's current stream, the one
``numba_launch`` launches the codec kernels on (``numba_launch.numba_stream``;
``numba_launch.DeviceView`` carries C-contiguous arrays only).

``paged_write`` (host syncs: ``numba_cuda.encode`` reads back its norm-overflow flag, and choosing
channels reads ``slot_mapping``)::

    gather_kernel      key [T, H, d] -> xt [H, n, d] (contiguous): row i is token rows[i], or token i
                       with padding tokens (slot < 0) zeroed, so stale rows cannot overflow a norm
    numba_cuda.encode  xt -> records [H, n, R] (and, when the cache has none, the channel
                       permutations, chosen from the non-padding tokens only: n = their count)
    scatter_kernel     records -> cache[block, offset, head, :] for slots in range
    raw_copy_kernel    key -> raw[raw_slot_of_block[block], offset, head, :] where that row exists
                       (converted to the pool's dtype, bfloat16 rounded to nearest even)

Element-wise kernels are grid-stride loops of ``THREADS`` threads.

``paged_attention_kernel``: one block of ``THREADS`` threads per (KV head, request); no host sync.
The block takes its request's query rows (query token t, GQA head h of the group: row ``t * G + h``)
``qr`` at a time; for each such pass it walks the positions ``0 .. ctx + last token of the pass`` in
tiles of ``tk`` tokens. Each tile's tokens are staged in natural channel order as float32 K and V
rows: raw from the pool when their block has a raw row, raw from ``key``/``value`` for the request's
own new tokens, else decoded from their records (extended rotated rows via
``numba_kernels._ext_value``, then S and R undone by ``numba_kernels._unrotate``, then channels
un-permuted). Logits are plain dot products with the query; one online softmax per row in float32,
causal (row of token t sits at position ``ctx + t``). Dynamic shared memory, float32, by offset::

    qs  [qr, d]     query rows of the pass          ks  [tk, d]     staged K rows
    acc [qr, d]     running weighted value sums     vs  [tk, d]     staged V rows
    ps  [qr, tk]    logits, then weights            es  [tk, W]     extended rows being decoded
    ms, ls, cs [qr] running max, sum, correction    xs  [tk, d]     decoded rows, record order

and three static arrays [MAX_TK] hold each tile token's source (kind, block or row, offset).
Out-of-range block ids, raw rows and slots are skipped (a skipped context token is masked out; a
raw row outside the pool falls back to the records); a context longer than the block table is cut
to it; a request whose ``query_start_loc`` or ``seq_lens`` cannot hold its new tokens is left
unwritten.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import cuda, float32, int32, int64

from ..paged_cache import PagedCache
from . import numba_cuda as nc
from . import numba_launch
from .numba_kernels import NEG_INF, THREADS, _bf16_bits, _ext_value, _to_f32, _unrotate
from .numba_launch import simulated
from .occupancy import STATIC_SMEM_LIMIT

# Most tokens per attention tile (the static source arrays' length), and the bytes those arrays take
# (int32 kind, int64 block or row, int32 offset per token) beside the dynamic shared memory.
MAX_TK = 16
STATIC_SMEM = MAX_TK * (4 + 8 + 4)
# Tile sizes tried, largest first: tokens per tile (multiples of VPT, as _rowmat needs) and query
# rows per pass.
TOKEN_TILES = (16, 8, 4)
ROW_TILES = (16, 8, 4)
# Blocks of the element-wise grid-stride kernels: enough to fill a GPU; one in the simulator, where
# every simulated thread is slow.
ELEMENTWISE_BLOCKS = 1024
# Token sources of an attention tile.
SKIP, COMPRESSED, RAW, NEW = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------ arrays
def _arr(x: Any) -> Any:
    """``x`` as a Numba device array keeping its strides (None stays None).

    Accepts what ``numba_cuda.asarray`` returns (``DeviceView``, Numba device arrays) and any other
    CUDA array (torch or CuPy views included; bfloat16 re-labelled as uint16).
    """
    if x is None or simulated():
        return x
    from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase

    if isinstance(x, DeviceNDArrayBase):
        return x
    iface = getattr(x, "__cuda_array_interface__", None)
    if iface is None:
        return cuda.as_cuda_array(nc.asarray(x))
    if iface["typestr"] in ("<V2", "|V2"):
        return cuda.as_cuda_array(nc._Relabelled(iface, "<u2"))
    return cuda.as_cuda_array(x)


def _bf16(a: Any) -> bool:
    """uint16 arrays hold bfloat16 bits (``numba_cuda.asarray``'s convention)."""
    return bool(np.dtype(a.dtype) == np.uint16)


def _grid(total: int) -> int:
    cap = 1 if simulated() else ELEMENTWISE_BLOCKS
    return max(1, min(cap, -(-total // THREADS)))


@functools.cache
def _placeholder(dtype: str, ndim: int, device: int) -> Any:
    """A one-element device array standing in for an absent input of ``ndim`` dimensions (uploaded
    once per device: a copy per call would wait on the stream)."""
    return cuda.to_device(np.zeros((1,) * ndim, dtype))


# ------------------------------------------------------------------------------- device functions
@cuda.jit(device=True, inline="always")
def _store(a, i0, i1, i2, v, bf16):  # pragma: no cover
    """``a[i0, i1, i2] = v`` (float32) in ``a``'s dtype; ``bf16``: ``a`` holds bfloat16 bits."""
    if bf16:
        a[i0, i1, i2] = _bf16_bits(v)
    else:
        a[i0, i1, i2] = v


@cuda.jit(device=True, inline="always")
def _source(j, pos, r, ctx, q0, block_table, block_size, num_blocks, raw_slot, has_raw, num_raw,
            kind, src_a, src_b):  # pragma: no cover
    """Where the token at ``pos`` of request ``r`` is read from, into ``kind/src_a/src_b[j]``.

    NEW: ``key``/``value`` row ``src_a``; RAW: raw pool row ``src_a``, offset ``src_b``;
    COMPRESSED: block ``src_a``, offset ``src_b``; SKIP: out of the block table or the cache.
    """
    k = SKIP
    a = int64(0)
    b = int32(0)
    if pos >= ctx:
        k = NEW
        a = int64(q0 + pos - ctx)
    else:
        logical = pos // block_size
        if logical < block_table.shape[1]:
            blk = int64(block_table[r, logical])
            if 0 <= blk < num_blocks:
                k = COMPRESSED
                a = blk
                b = int32(pos - logical * block_size)
                if has_raw:
                    rr = int64(raw_slot[blk])
                    if 0 <= rr < num_raw:
                        k = RAW
                        a = rr
    kind[j] = k
    src_a[j] = a
    src_b[j] = b


@cuda.jit(device=True, inline="always")
def _stage(sm, dst, es, xs, tk, kind, src_a, src_b, cache, head, chans, has_ch, raw, bf16_raw,
           new, bf16_new, d, rot, proj, cent, meta, g, qjl, qjl_scale, tid):  # pragma: no cover
    """K or V rows of the tile's ``tk`` tokens, float32 in natural channel order, at ``sm[dst]``.

    Compressed tokens go through their extended rotated rows (``es``, pitch W) and the decoded rows
    in record order (``xs``, pitch d); other rows of ``es`` are zero so the shared products stay
    finite. Ends with a barrier.
    """
    width = 2 * d if qjl else d
    for idx in range(tid, tk * width, THREADS):
        j = idx // width
        c = idx - j * width
        val = float32(0.0)
        if kind[j] == COMPRESSED:
            val = _ext_value(cache[src_a[j], src_b[j]], head, c, d, g, cent, meta, qjl_scale)
        sm[es + idx] = val
    cuda.syncthreads()
    _unrotate(sm, es, xs, tk, d, g, rot, proj, qjl, tid)
    for idx in range(tid, tk * d, THREADS):
        j = idx // d
        c = idx - j * d
        k = kind[j]
        if k == COMPRESSED:
            dst_c = min(int32(chans[head, c]), d - 1) if has_ch else c
            sm[dst + j * d + dst_c] = sm[xs + idx]
        elif k == RAW:
            sm[dst + idx] = _to_f32(raw[src_a[j], src_b[j], head, c], bf16_raw)
        elif k == NEW:
            sm[dst + idx] = _to_f32(new[src_a[j], head, c], bf16_new)
        else:
            sm[dst + idx] = 0.0
    cuda.syncthreads()


# ------------------------------------------------------------------------------------------ kernels
@cuda.jit
def gather_kernel(x, rows, use_rows, slot_mapping, xt):  # pragma: no cover
    """``xt[h, i, c] = x[rows[i], h, c]`` (``use_rows``) or ``x[i, h, c]``, zero where slot i < 0."""
    heads, n, d = xt.shape
    total = heads * n * d
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        h = idx // (n * d)
        i = (idx // d) % n
        c = idx % d
        if use_rows:
            xt[h, i, c] = x[rows[i], h, c]
        elif slot_mapping[i] >= 0:
            xt[h, i, c] = x[i, h, c]
        else:
            xt[h, i, c] = 0


@cuda.jit
def scatter_kernel(records, rows, use_rows, slot_mapping, cache):  # pragma: no cover
    """``cache[block, offset, h, :] = records[h, i, :]`` for the slot of token rows[i] (or i)."""
    heads, n, nbytes = records.shape
    num_blocks, block_size = cache.shape[0], cache.shape[1]
    total = n * heads * nbytes
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        i = idx // (heads * nbytes)
        h = (idx // nbytes) % heads
        b = idx % nbytes
        slot = int64(slot_mapping[rows[i] if use_rows else i])
        if slot >= 0:
            blk = slot // block_size
            if blk < num_blocks:
                cache[blk, slot - blk * block_size, h, b] = records[h, i, b]


@cuda.jit
def raw_copy_kernel(x, bf16_x, slot_mapping, raw_slot, raw, bf16_raw):  # pragma: no cover
    """``raw[raw_slot[block], offset, h, c] = x[i, h, c]`` where slot i and its raw row exist."""
    n = slot_mapping.shape[0]
    heads, d = x.shape[1], x.shape[2]
    num_blocks, num_raw, block_size = raw_slot.shape[0], raw.shape[0], raw.shape[1]
    total = n * heads * d
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        i = idx // (heads * d)
        h = (idx // d) % heads
        c = idx % d
        slot = int64(slot_mapping[i])
        if slot >= 0:
            blk = slot // block_size
            if blk < num_blocks:
                rr = int64(raw_slot[blk])
                if 0 <= rr < num_raw:
                    off = slot - blk * block_size
                    if bf16_raw and bf16_x:
                        raw[rr, off, h, c] = x[i, h, c]
                    elif bf16_raw:
                        raw[rr, off, h, c] = _bf16_bits(_to_f32(x[i, h, c], False))
                    else:
                        raw[rr, off, h, c] = _to_f32(x[i, h, c], bf16_x)


@cuda.jit
def paged_attention_kernel(query, key, value, kcache, vcache, kchans, has_kch, vchans, has_vch,
                           raw_k, raw_v, raw_slot, has_raw, block_table, seq_lens, qsl, scale, out,
                           bf16_q, bf16_kv, bf16_rk, bf16_rv, bf16_out, qr, tk, wmax,
                           krot, kproj, kcent, kmeta, kg, kqjl, kqs,
                           vrot, vproj, vcent, vmeta, vg, vqjl, vqs):  # pragma: no cover
    """Block (KV head, request): causal attention of the request's query rows of this KV head's
    GQA group over its paged context and its own new tokens (module docstring)."""
    sm = cuda.shared.array(0, float32)
    kind = cuda.shared.array(MAX_TK, int32)
    src_a = cuda.shared.array(MAX_TK, int64)
    src_b = cuda.shared.array(MAX_TK, int32)
    tid = cuda.threadIdx.x
    head = cuda.blockIdx.x
    r = cuda.blockIdx.y
    n_tok, h_q, d = query.shape
    num_blocks, block_size, h_kv = kcache.shape[0], kcache.shape[1], kcache.shape[2]
    groups = h_q // h_kv
    q0 = int64(qsl[r])
    q1 = int64(qsl[r + 1])
    q_len = q1 - q0
    ctx = int64(seq_lens[r]) - q_len
    if q_len <= 0 or q0 < 0 or q1 > n_tok or ctx < 0:
        return  # the whole block leaves together: no barrier is left waiting
    # A context longer than the block table is cut to it (its tokens past the table would all be
    # skipped; a hostile seq_lens must not make the block loop over them).
    ctx = min(ctx, int64(block_table.shape[1]) * block_size)
    num_raw = raw_k.shape[0]
    qs = 0
    acc = qs + qr * d
    ps = acc + qr * d
    ms = ps + qr * tk
    ls = ms + qr
    cs = ls + qr
    ks = cs + qr
    vs = ks + tk * d
    es = vs + tk * d
    xs = es + tk * wmax
    rows = q_len * groups
    for p0 in range(0, rows, qr):
        nr = min(qr, rows - p0)
        for idx in range(tid, qr * d, THREADS):
            row = idx // d
            val = float32(0.0)
            if row < nr:
                t = (p0 + row) // groups
                h = head * groups + (p0 + row) - t * groups
                val = _to_f32(query[q0 + t, h, idx - row * d], bf16_q)
            sm[qs + idx] = val
            sm[acc + idx] = 0.0
        for row in range(tid, qr, THREADS):
            sm[ms + row] = NEG_INF
            sm[ls + row] = 0.0
        stop = ctx + (p0 + nr - 1) // groups + 1  # positions up to the pass's last query token
        for j0 in range(0, stop, tk):
            nk = min(tk, stop - j0)
            if tid < tk:
                if tid < nk:
                    _source(tid, j0 + tid, r, ctx, q0, block_table, block_size, num_blocks, raw_slot,
                            has_raw, num_raw, kind, src_a, src_b)
                else:
                    kind[tid] = SKIP
            cuda.syncthreads()
            _stage(sm, ks, es, xs, tk, kind, src_a, src_b, kcache, head, kchans, has_kch, raw_k,
                   bf16_rk, key, bf16_kv, d, krot, kproj, kcent, kmeta, kg, kqjl, kqs, tid)
            _stage(sm, vs, es, xs, tk, kind, src_a, src_b, vcache, head, vchans, has_vch, raw_v,
                   bf16_rv, value, bf16_kv, d, vrot, vproj, vcent, vmeta, vg, vqjl, vqs, tid)
            for idx in range(tid, qr * tk, THREADS):
                row = idx // tk
                j = idx - row * tk
                logit = NEG_INF
                if row < nr and kind[j] != SKIP and j0 + j <= ctx + (p0 + row) // groups:
                    dot = float32(0.0)
                    for c in range(d):
                        dot += sm[qs + row * d + c] * sm[ks + j * d + c]
                    logit = dot * scale
                sm[ps + idx] = logit
            cuda.syncthreads()
            for row in range(tid, qr, THREADS):  # online softmax update, one thread per row
                m_old = sm[ms + row]
                m_new = m_old
                for j in range(tk):
                    m_new = max(m_new, sm[ps + row * tk + j])
                if m_new == NEG_INF:  # nothing visible yet: no weights, nothing to rescale
                    for j in range(tk):
                        sm[ps + row * tk + j] = 0.0
                    sm[cs + row] = 1.0
                else:
                    total = float32(0.0)
                    for j in range(tk):
                        p = math.exp(sm[ps + row * tk + j] - m_new)
                        sm[ps + row * tk + j] = p
                        total += p
                    corr = math.exp(m_old - m_new)  # 0 while m_old is -inf
                    sm[ls + row] = sm[ls + row] * corr + total
                    sm[ms + row] = m_new
                    sm[cs + row] = corr
            cuda.syncthreads()
            for idx in range(tid, nr * d, THREADS):
                row = idx // d
                c = idx - row * d
                a = sm[acc + idx] * sm[cs + row]
                for j in range(tk):
                    a += sm[ps + row * tk + j] * sm[vs + j * d + c]
                sm[acc + idx] = a
            cuda.syncthreads()
        for idx in range(tid, nr * d, THREADS):
            row = idx // d
            t = (p0 + row) // groups
            h = head * groups + (p0 + row) - t * groups
            total = sm[ls + row]
            val = sm[acc + idx] / total if total > 0.0 else float32(0.0)
            _store(out, q0 + t, h, idx - row * d, val, bf16_out)
        cuda.syncthreads()


# --------------------------------------------------------------------------------------------- ops
def _launch(kernel: Any, device: int, grid: Any, smem_floats: int, *args: Any) -> None:
    """Numba's own launch on the caller's current stream (strided arrays; see the module docstring)."""
    kernel[grid, THREADS, numba_launch.numba_stream(device), 4 * smem_floats](*args)


def _encode_scatter(x: Any, slots: Any, rows: Any, n: int, cache: Any, cfg: Any, channels: Any,
                    dev: int) -> Any:
    """Encode token rows of ``x`` [T, H, d] (``rows[:n]``, or the first ``n`` with padding zeroed when
    ``rows`` is None) into their slots of ``cache``; returns the channel permutations used."""
    heads, d = int(x.shape[1]), int(x.shape[2])
    xt = nc._empty((heads, n, d), x.dtype, dev)
    use_rows = rows is not None
    rows_arr = rows if use_rows else _placeholder("int64", 1, dev)
    _launch(gather_kernel, dev, _grid(heads * n * d), 0, x, rows_arr, use_rows, slots, _arr(xt))
    records, channels = nc.encode(xt, cfg, channels)
    _launch(scatter_kernel, dev, _grid(heads * n * cfg.record_bytes), 0, _arr(records), rows_arr, use_rows,
            slots, cache)
    return channels


def paged_write(cache: PagedCache, key: Any, value: Any, slot_mapping: Any) -> tuple[Any, Any]:
    """Encode the new tokens into the paged cache and copy them into the raw pool (in place).

    Parameters
    ----------
    cache : PagedCache
        Its arrays on one GPU (any strides); written in place.
    key, value : GPU arrays, [T, H, d], float16/float32, or uint16 holding bfloat16
    slot_mapping : GPU array, [<= T], int
        Negative slots are padding and skipped; so are slots past the cache.

    Returns
    -------
    k_channels, v_channels : GPU arrays [H, d] uint16, or None
        The cache's own permutations when it has them; else (half-integer bits) those chosen from
        this batch's non-padding tokens; None while no token has been written.
    """
    k_ch, v_ch = cache.k_channels, cache.v_channels
    n = int(slot_mapping.shape[0])
    if n == 0:
        return k_ch, v_ch
    with nc._on_device(key) as dev:
        key, value, slots = _arr(key), _arr(value), _arr(slot_mapping)
        rows = None
        count = n
        if any(cfg.split and ch is None for cfg, ch in ((cache.k_config, k_ch), (cache.v_config, v_ch))):
            # Channels are chosen from the non-padding tokens only: their rows, found on the host.
            valid = np.flatnonzero(numba_launch.to_host(slots, dev) >= 0)
            if valid.size == 0:
                return k_ch, v_ch
            rows, count = cuda.to_device(valid.astype(np.int64)), int(valid.size)
        k_new = _encode_scatter(key, slots, rows, count, _arr(cache.k_cache), cache.k_config, k_ch, dev)
        v_new = _encode_scatter(value, slots, rows, count, _arr(cache.v_cache), cache.v_config, v_ch, dev)
        if cache.has_raw:
            raw_slot = _arr(cache.raw_slot_of_block)
            for x, raw in ((key, _arr(cache.raw_k)), (value, _arr(cache.raw_v))):
                total = n * int(x.shape[1]) * int(x.shape[2])
                _launch(raw_copy_kernel, dev, _grid(total), 0, x, _bf16(x), slots, raw_slot, raw, _bf16(raw))
    return (k_new if k_ch is None else k_ch), (v_new if v_ch is None else v_ch)


def _tiles(d: int, wmax: int) -> tuple[int, int, int]:
    """(tokens per tile, query rows per pass, shared floats): the largest tiles within STATIC_SMEM_LIMIT."""
    budget = (STATIC_SMEM_LIMIT - STATIC_SMEM) // 4
    for tk in TOKEN_TILES:
        for qr in ROW_TILES:
            floats = qr * (2 * d + tk + 3) + tk * (3 * d + wmax)
            if floats <= budget:
                return tk, qr, floats
    raise ValueError(f"head dimension {d} too large for the numba_cuda paged attention tiles")


def paged_attention(
    cache: PagedCache,
    query: Any,
    key: Any,
    value: Any,
    block_table: Any,
    seq_lens: Any,
    query_start_loc: Any,
    scale: float,
    out: Any,
    num_decodes: int | None,
) -> Any:
    """Causal attention of a mixed decode/prefill batch over the paged cache, written into ``out``.

    Parameters
    ----------
    cache : PagedCache
        Its arrays on one GPU (any strides).
    query : GPU array, [T, h_q, d]
        ``h_q`` a multiple of H; query head i reads KV head ``i // (h_q // H)``.
    key, value : GPU arrays, [T, H, d]
        The new tokens, read raw.
    block_table : GPU array, [B, max_blocks], int
    seq_lens : GPU array, [B], int
    query_start_loc : GPU array, [B + 1], int
    scale : float
    out : GPU array, [T, h_q, d], dtype of ``query``
        Rows of the requests' tokens are written; padding rows are left untouched.
    num_decodes : int or None
        Not needed: every request is handled alike, from device metadata (no host sync).

    Returns
    -------
    out
    """
    del num_decodes
    kc, vc = cache.k_config, cache.v_config
    for name, cfg, ch in (("k_channels", kc, cache.k_channels), ("v_channels", vc, cache.v_channels)):
        if cfg.split and ch is None:
            raise ValueError(f"{name} is None: paged_write must choose the channel permutations first")
    b, h_kv, d = int(block_table.shape[0]), int(cache.k_cache.shape[2]), kc.d
    if b == 0 or int(query.shape[0]) == 0:
        return out
    with nc._on_device(query) as dev:
        q, o = _arr(query), _arr(out)
        key, value = _arr(key), _arr(value)
        k_cache, v_cache = _arr(cache.k_cache), _arr(cache.v_cache)
        table, lens, starts = _arr(block_table), _arr(seq_lens), _arr(query_start_loc)
        kt, vt = nc._device_tables(kc, dev), nc._device_tables(vc, dev)
        wmax = max(kt.width(d), vt.width(d))
        tk, qr, floats = _tiles(d, wmax)
        no_ch = _placeholder("uint16", 2, dev)
        kch = no_ch if cache.k_channels is None else _arr(cache.k_channels)
        vch = no_ch if cache.v_channels is None else _arr(cache.v_channels)
        if cache.has_raw:
            raw_k, raw_v, raw_slot = _arr(cache.raw_k), _arr(cache.raw_v), _arr(cache.raw_slot_of_block)
        else:
            raw_k = raw_v = _placeholder("float32", 4, dev)
            raw_slot = _placeholder("int32", 1, dev)
        tabs = [(_arr(t.rot), _arr(t.proj), _arr(t.cent), _arr(t.meta), t.g, t.qjl, t.qjl_scale)
                for t in (kt, vt)]
        _launch(paged_attention_kernel, dev, (h_kv, b), floats,
                q, key, value, k_cache, v_cache, kch, cache.k_channels is not None, vch,
                cache.v_channels is not None, raw_k, raw_v, raw_slot, cache.has_raw, table, lens, starts,
                np.float32(scale), o, _bf16(q), _bf16(key), _bf16(raw_k), _bf16(raw_v), _bf16(o), qr, tk,
                wmax,
                *tabs[0], *tabs[1])
    return out

