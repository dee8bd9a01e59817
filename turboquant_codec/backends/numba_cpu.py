"""Numba on the host: the paged decode step, reading the codes in place (serving on CPU).

Serves ``paged_attention`` (mode "mse" K and V; ``capabilities`` says so, everything else falls to
the NumPy reference). Decode requests (one new token) run one compiled task per (request, KV head),
spread over the cores; prefill requests go through the reference's dense path in float32, whose
products are BLAS matrix products.

Per task, for the ``G`` query heads of one KV head (the query scaled, then permuted and rotated
once into the keys' record order; the codes are unpacked once per token and serve all ``G``
heads)::

    score(token)  = sum_groups |x_g| * <q_rot_g, centroid[codes_g]>     codes read from the record
                  = <q, k_raw>                                          raw pool / new token
    acc_rot      += p * |x_g| * centroid[codes_g]    (rotated domain, record order)
    acc_raw      += p * v_raw                        (model domain, channel order)
    out           = (unpermute(acc_rot_g @ R_g) + acc_raw) / sum(p)     one un-rotation per head

The Hadamard rotation kinds rotate the query and un-rotate the values by sign flips and fast
Walsh-Hadamard transforms (``g log2 g`` additions per round instead of ``g^2`` multiply-adds).

Records follow ``config``'s byte layout. Codes are unpacked eight at a time (eight ``b``-bit codes
fill ``b`` whole bytes) as four two-code fields, each looked up in a pair table of centroids;
bfloat16 norms and 16-bit raw pools are widened through 65536-entry tables (exact). The phases
(queries, scores, softmax, values, finish) are separate compiled functions, so each can be timed
alone. Float32 throughout; results match the float64 reference to float32
rounding.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .._ops import Availability
from ..config import CodecConfig
from ..paged_cache import PagedCache
from ..transforms import tables
from . import numpy_ref

try:
    from numba import njit, prange

    _IMPORT_ERROR = ""
except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
    _IMPORT_ERROR = f"numba failed to import: {type(exc).__name__}: {exc}"

MAX_CODES = 16


def availability() -> Availability:
    return Availability(not _IMPORT_ERROR, _IMPORT_ERROR)


asarray = numpy_ref.asarray


def fwht_rotate(x: np.ndarray, signs: np.ndarray, inverse: bool = False) -> np.ndarray:
    """A Hadamard-kind rotation of each row by sign flips and a compiled fast Walsh-Hadamard transform.

    Parameters
    ----------
    x : ndarray (n, g) float64
        Rows of one group, ``g`` a power of two >= 4 (any strides).
    signs : ndarray (rounds, g) float64
        ``transforms.hadamard_signs``: ``R = H D_rounds ... H D_1``.
    inverse : bool
        False: ``R x`` per row; True: ``R^T x``.

    Returns
    -------
    ndarray (n, g) float64
        ``x @ R.T`` (or ``x @ R``) within float64 rounding, in ``rounds * g * log2 g`` additions per row.
    """
    return _fwht_rows(x, np.ascontiguousarray(signs, dtype=np.float64), bool(inverse))


# ------------------------------------------------------------------------------------------ tables
@functools.lru_cache(maxsize=64)
def _codec_tables(cfg: CodecConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per configuration: ``meta`` [groups, 6] int64 (dim, code bits, code offset, norm offset,
    first channel in record order, Hadamard rounds: 0 for a dense rotation), ``rot`` [groups, g, g]
    float32, ``pairs`` [groups, 256, 2] float32 (entry ``x``: the centroids of the two codes packed in
    the ``2 * bits`` bits of ``x``, low code first) and ``signs`` [groups, max(rounds, 1), g] float32
    (the Hadamard kinds' sign rows; zeros for Haar)."""
    groups, tabs = cfg.groups, tables(cfg)
    if any(g.dim % 8 for g in groups):  # head dims are multiples of 16: groups of d or d / 2
        raise ValueError(f"{cfg}: group sizes {[g.dim for g in groups]} are not multiples of 8")
    g_max = max(g.dim for g in groups)
    starts = np.cumsum([0] + [g.dim for g in groups])[:-1]
    rounds = [0 if t.signs is None else t.signs.shape[0] for t in tabs]
    meta = np.array([[g.dim, g.code_bits, g.code_offset, g.norm_offset, s, r]
                     for g, s, r in zip(groups, starts, rounds, strict=True)], np.int64)
    rot = np.zeros((len(groups), g_max, g_max), np.float32)
    signs = np.zeros((len(groups), max(max(rounds), 1), g_max), np.float32)
    pairs = np.zeros((len(groups), MAX_CODES * MAX_CODES, 2), np.float32)
    for i, (g, t) in enumerate(zip(groups, tabs, strict=True)):
        rot[i, : g.dim, : g.dim] = t.rotation
        if t.signs is not None:
            signs[i, : t.signs.shape[0], : g.dim] = t.signs
        x = np.arange(1 << (2 * g.code_bits))
        pairs[i, : x.size, 0] = t.centroids[x & ((1 << g.code_bits) - 1)]
        pairs[i, : x.size, 1] = t.centroids[x >> g.code_bits]
    return meta, rot, pairs, signs


@functools.cache
def _widen() -> tuple[np.ndarray, np.ndarray]:
    """float32 values of every float16 and every bfloat16 bit pattern."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    half = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    brain = (bits << 16).view(np.float32)
    return half, brain


_PLACEHOLDER32, _PLACEHOLDER16 = np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.uint16)


def _raw_views(pool: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """A raw pool as (float32 view, uint16 view, kind): kind 0 reads the first, 1 / 2 widen the
    second as float16 / bfloat16; the unused one is a placeholder of the same rank (never read)."""
    if pool is None:
        return _PLACEHOLDER32, _PLACEHOLDER16, 0
    name = str(pool.dtype)
    if name == "float32":
        return pool, _PLACEHOLDER16, 0
    return _PLACEHOLDER32, pool.view(np.uint16), 1 if name == "float16" else 2


# ------------------------------------------------------------------------------------------ kernel
if not _IMPORT_ERROR:

    @njit(inline="always", cache=True)
    def _pairs(rec: Any, at: int, n8: int, bits: int, pairs: np.ndarray, gi: int, vals: np.ndarray,
               start: int) -> None:
        """Centroids of ``8 * n8`` codes of ``bits`` bits from byte ``at``: eight codes fill ``bits``
        whole bytes, read as one word and four two-code fields through the pair table. Unsigned
        indices: Numba then emits no negative-index wraparound, which blocks unrolling."""
        pair_mask = np.uint64((1 << (2 * bits)) - 1)
        for k in range(n8):
            o = np.uint64(at + k * bits)
            word = np.uint64(0)
            for i in range(bits):
                word |= np.uint64(rec[o + np.uint64(i)]) << np.uint64(8 * i)
            base = np.uint64(start + 8 * k)
            for p in range(4):
                x = (word >> np.uint64(2 * bits * p)) & pair_mask
                vals[base + np.uint64(2 * p)] = pairs[gi, x, 0]
                vals[base + np.uint64(2 * p + 1)] = pairs[gi, x, 1]

    @njit(inline="always", cache=True)
    def _unpack(rec: Any, meta: np.ndarray, pairs: np.ndarray, brain: np.ndarray, vals: np.ndarray,
                norms: np.ndarray) -> None:
        """One record's centroids ``vals`` [d] in record order and its group norms ``norms`` [groups].

        The code width is a constant in each branch (Numba unrolls the byte and field loops)."""
        for gi in range(meta.shape[0]):
            dim, bits, start = meta[gi, 0], meta[gi, 1], meta[gi, 4]
            code_at, norm_at = meta[gi, 2], meta[gi, 3]
            norms[gi] = brain[np.int64(rec[norm_at]) | (np.int64(rec[norm_at + 1]) << 8)]
            n8 = dim >> 3
            if bits == 4:
                _pairs(rec, code_at, n8, 4, pairs, gi, vals, start)
            elif bits == 3:
                _pairs(rec, code_at, n8, 3, pairs, gi, vals, start)
            elif bits == 2:
                _pairs(rec, code_at, n8, 2, pairs, gi, vals, start)
            else:
                _pairs(rec, code_at, n8, 1, pairs, gi, vals, start)

    @njit(inline="always", cache=True)
    def _raw_row(pool32: np.ndarray, pool16: np.ndarray, kind: int, row: int, off: int, h: int,
                 half: np.ndarray, brain: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """One raw token [d] float32: a view of a float32 pool, or widened into ``vals``."""
        if kind == 0:
            return pool32[row, off, h]
        src = pool16[row, off, h]
        table = half if kind == 1 else brain
        for c in range(vals.size):
            vals[c] = table[src[c]]
        return vals

    @njit(inline="always", cache=True)
    def _block(table_row: np.ndarray, jb: int, ctx: int, records: np.ndarray, rsb: np.ndarray,
               pool32: np.ndarray, pool16: np.ndarray, kind: int) -> tuple[Any, Any, Any, Any]:
        """Logical block ``jb`` of a context of ``ctx`` tokens: (first token, tokens, physical block
        or -1 when the table's entry lies outside the cache, raw-pool row or -1: read the codes)."""
        block_size = records.shape[1]
        t0 = jb * block_size
        cnt = min(block_size, ctx - t0)
        blk = np.int64(table_row[jb])
        if blk < 0 or blk >= records.shape[0]:
            return t0, cnt, np.int64(-1), np.int64(-1)
        raw = np.int64(rsb[blk])
        n_raw = pool32.shape[0] if kind == 0 else pool16.shape[0]
        return t0, cnt, blk, raw if 0 <= raw < n_raw else np.int64(-1)

    @njit(inline="always", cache=True)
    def _hadamard(row: np.ndarray) -> None:
        """In place: ``row`` [g] (g a power of two, >= 4) -> its unnormalised Walsh-Hadamard transform.
        The first two stages as one radix-4 step in registers; later stages run over contiguous
        halves (vectorised)."""
        g = row.size
        for i in range(0, g, 4):
            a, b, c, e = row[i], row[i + 1], row[i + 2], row[i + 3]
            s0, s1, s2, s3 = a + b, a - b, c + e, c - e
            row[i], row[i + 1], row[i + 2], row[i + 3] = s0 + s2, s1 + s3, s0 - s2, s1 - s3
        h = 4
        while h < g:
            for i in range(0, g, 2 * h):
                low, high = row[i : i + h], row[i + h : i + 2 * h]
                for j in range(h):
                    a, b = low[j], high[j]
                    low[j], high[j] = a + b, a - b
            h *= 2

    @njit(inline="always", cache=True)
    def _hadamard_rotate(row: np.ndarray, signs: np.ndarray, inverse: bool) -> None:
        """In place: ``row`` [g] -> ``R row`` (or ``R^T row``) for ``R = H D_k ... H D_1`` with
        ``D_r = diag(signs[r])`` and ``H`` normalised; ``signs`` [rounds, >= g]."""
        g, rounds = row.size, signs.shape[0]
        scale = row.dtype.type(1.0 / np.sqrt(g))
        for r in range(rounds):
            if inverse:
                _hadamard(row)
                sr = signs[rounds - 1 - r]
                for c in range(g):
                    row[c] *= sr[c] * scale
            else:
                sr = signs[r]
                for c in range(g):
                    row[c] *= sr[c] * scale
                _hadamard(row)

    @njit(fastmath=True, cache=True)
    def _fwht_rows(x: np.ndarray, signs: np.ndarray, inverse: bool) -> np.ndarray:
        """[n, g] float64 rows (any strides) -> their rotations, a new contiguous [n, g]."""
        out = np.empty(x.shape, np.float64)
        for r in range(x.shape[0]):
            row = out[r]
            for c in range(x.shape[1]):
                row[c] = x[r, c]
            _hadamard_rotate(row, signs, inverse)
        return out

    @njit(fastmath=True, cache=True)
    def _queries(q: np.ndarray, scale: float, k_meta: np.ndarray, k_rot: np.ndarray, k_sgn: np.ndarray,
                 k_chan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q [G, d] (one KV head's query heads) -> scaled (q_raw) and rotated per key group in the
        keys' record order (q_rot), both [G, d] float32. Hadamard kinds: sign flips and fast
        transforms in place of the dense rows."""
        n_group, d = q.shape
        q_raw = np.empty((n_group, d), np.float32)
        q_rot = np.empty((n_group, d), np.float32)
        for g in range(n_group):
            for c in range(d):
                q_raw[g, c] = q[g, c] * scale
        permuted = np.empty(d, np.float32)
        for g in range(n_group):
            for c in range(d):  # channel lists clamped to d, as in the GPU kernels: never out of bounds
                permuted[c] = q_raw[g, min(max(k_chan[c], 0), d - 1)]
            for gi in range(k_meta.shape[0]):
                dim, start, rounds = k_meta[gi, 0], k_meta[gi, 4], k_meta[gi, 5]
                x = permuted[start : start + dim]
                if rounds > 0:
                    y = q_rot[g, start : start + dim]
                    y[:] = x
                    _hadamard_rotate(y, k_sgn[gi, :rounds, :dim], False)
                    continue
                for j in range(dim):
                    row = k_rot[gi, j, :dim]
                    acc = np.float32(0.0)
                    for c in range(dim):
                        acc += row[c] * x[c]
                    q_rot[g, start + j] = acc
        return q_raw, q_rot

    @njit(fastmath=True, cache=True)
    def _scores(q_raw, q_rot, k_row, ctx, table_row, kc, h, rsb, rk32, rk16, kind,  # noqa: ANN001
                k_meta, k_pairs, half, brain) -> np.ndarray:
        """s [G, ctx + 1] float32: logits over the context, the new token's (``k_row``) last."""
        n_group, d = q_raw.shape
        s = np.empty((n_group, ctx + 1), np.float32)
        vals = np.empty(d, np.float32)
        norms = np.empty(k_meta.shape[0], np.float32)
        for jb in range((ctx + kc.shape[1] - 1) // kc.shape[1]):
            t0, cnt, blk, raw = _block(table_row, jb, ctx, kc, rsb, rk32, rk16, kind)
            if blk < 0:
                for g in range(n_group):
                    for tt in range(cnt):
                        s[g, t0 + tt] = -np.inf
                continue
            if raw >= 0:
                for tt in range(cnt):
                    x = _raw_row(rk32, rk16, kind, raw, tt, h, half, brain, vals)
                    for g in range(n_group):
                        qq = q_raw[g]
                        acc = np.float32(0.0)
                        for c in range(d):
                            acc += qq[c] * x[c]
                        s[g, t0 + tt] = acc
            else:
                for tt in range(cnt):
                    _unpack(kc[blk, tt, h], k_meta, k_pairs, brain, vals, norms)
                    for g in range(n_group):
                        tot = np.float32(0.0)
                        for gi in range(k_meta.shape[0]):
                            # Slices, so the inner index runs from 0 (no wraparound: vectorised).
                            dim, start = k_meta[gi, 0], k_meta[gi, 4]
                            qq, vv = q_rot[g, start : start + dim], vals[start : start + dim]
                            acc = np.float32(0.0)
                            for c in range(dim):
                                acc += qq[c] * vv[c]
                            tot += acc * norms[gi]
                        s[g, t0 + tt] = tot
        for g in range(n_group):
            acc = np.float32(0.0)
            for c in range(d):
                acc += q_raw[g, c] * k_row[c]
            s[g, ctx] = acc
        return s

    @njit(fastmath=True, cache=True)
    def _softmax(s: np.ndarray) -> np.ndarray:
        """In place: s [G, L] -> exp(s - max) per row; returns the row sums [G]."""
        total = np.zeros(s.shape[0], np.float32)
        for g in range(s.shape[0]):
            top = s[g].max()
            for t in range(s.shape[1]):
                p = np.exp(s[g, t] - top)
                s[g, t] = p
                total[g] += p
        return total

    @njit(fastmath=True, cache=True)
    def _values(p, v_row, ctx, table_row, vc, h, rsb, rv32, rv16, kind,  # noqa: ANN001
                v_meta, v_pairs, half, brain) -> tuple[np.ndarray, np.ndarray]:
        """sum_t p[g, t] v_t as (acc_rot: compressed tokens, rotated, record order; acc_raw: raw
        tokens and the new one ``v_row``, channel order), both [G, d] float32."""
        n_group, d = p.shape[0], v_row.shape[0]
        acc_rot = np.zeros((n_group, d), np.float32)
        acc_raw = np.zeros((n_group, d), np.float32)
        vals = np.empty(d, np.float32)
        norms = np.empty(v_meta.shape[0], np.float32)
        for jb in range((ctx + vc.shape[1] - 1) // vc.shape[1]):
            t0, cnt, blk, raw = _block(table_row, jb, ctx, vc, rsb, rv32, rv16, kind)
            if blk < 0:
                continue
            if raw >= 0:
                for tt in range(cnt):
                    x = _raw_row(rv32, rv16, kind, raw, tt, h, half, brain, vals)
                    for g in range(n_group):
                        w = p[g, t0 + tt]
                        acc = acc_raw[g]
                        for c in range(d):
                            acc[c] += w * x[c]
            else:
                for tt in range(cnt):
                    _unpack(vc[blk, tt, h], v_meta, v_pairs, brain, vals, norms)
                    for g in range(n_group):
                        for gi in range(v_meta.shape[0]):
                            dim, start = v_meta[gi, 0], v_meta[gi, 4]
                            w = p[g, t0 + tt] * norms[gi]
                            acc, vv = acc_rot[g, start : start + dim], vals[start : start + dim]
                            for c in range(dim):
                                acc[c] += w * vv[c]
        for g in range(n_group):
            w = p[g, ctx]
            for c in range(d):
                acc_raw[g, c] += w * v_row[c]
        return acc_rot, acc_raw

    @njit(fastmath=True, cache=True)
    def _finish(acc_rot, acc_raw, total, v_meta, v_rot, v_sgn, v_chan, out):  # noqa: ANN001
        """out [G, d] = (un-rotated acc_rot scattered through the value channels + acc_raw) / total."""
        d = acc_rot.shape[1]
        x = np.empty(d, np.float32)
        for g in range(acc_rot.shape[0]):
            x[:] = 0.0
            for gi in range(v_meta.shape[0]):
                dim, start, rounds = v_meta[gi, 0], v_meta[gi, 4], v_meta[gi, 5]
                y = x[start : start + dim]
                if rounds > 0:
                    y[:] = acc_rot[g, start : start + dim]
                    _hadamard_rotate(y, v_sgn[gi, :rounds, :dim], True)
                    continue
                for j in range(dim):
                    a, row = acc_rot[g, start + j], v_rot[gi, j, :dim]
                    for c in range(dim):
                        y[c] += a * row[c]
            inv = np.float32(1.0) / total[g]
            for c in range(d):
                ch = min(max(v_chan[c], 0), d - 1)
                out[g, ch] = (x[c] + acc_raw[g, ch]) * inv

    @njit(parallel=True, cache=True)
    def _decode_step(reqs, rows, seq, table, kc, vc, rsb, rk32, rk16, rv32, rv16, kind,  # noqa: ANN001
                     query, scale, k_new, v_new, k_meta, k_rot, k_sgn, k_pairs, k_chan, v_meta, v_rot,
                     v_sgn, v_pairs, v_chan, half, brain, out):
        """out[rows[i]] [h_q, d] float32 of the decode requests ``reqs`` (query rows ``rows``); one
        task per (request, KV head)."""
        n_heads = k_new.shape[1]
        n_group = query.shape[1] // n_heads
        for task in prange(reqs.size * n_heads):
            i, h = task // n_heads, task % n_heads
            r, row = reqs[i], rows[i]
            ctx = seq[r] - 1
            heads = slice(h * n_group, (h + 1) * n_group)
            q_raw, q_rot = _queries(query[row, heads], scale, k_meta, k_rot, k_sgn, k_chan[h])
            s = _scores(q_raw, q_rot, k_new[row, h], ctx, table[r], kc, h, rsb, rk32, rk16, kind,
                        k_meta, k_pairs, half, brain)
            total = _softmax(s)
            acc_rot, acc_raw = _values(s, v_new[row, h], ctx, table[r], vc, h, rsb, rv32, rv16, kind,
                                       v_meta, v_pairs, half, brain)
            _finish(acc_rot, acc_raw, total, v_meta, v_rot, v_sgn, v_chan[h], out[row, heads])


# ---------------------------------------------------------------------------------------------- op
def paged_attention(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                    query_start_loc: Any, scale: float, out: Any, num_decodes: int | None) -> Any:
    """As ``numpy_ref.paged_attention``; decode requests run the compiled step above.

    Index arrays go to the kernel as int32 (and the channel lists as int64), without a copy when
    they already are: a decode step costs the kernel plus a few microseconds of host time.
    """
    starts = np.asarray(query_start_loc, dtype=np.int32)
    seq = np.asarray(seq_lens, dtype=np.int32)
    table = np.ascontiguousarray(block_table, dtype=np.int32)
    q_lens = np.diff(starts)
    decodes = np.flatnonzero(q_lens == 1)
    for r in np.flatnonzero(q_lens > 1):
        numpy_ref.attend_request(cache, query, key, value, table[r], int(seq[r]),
                                 slice(int(starts[r]), int(starts[r + 1])), scale, out, np.float32)
    if decodes.size == 0:
        return out
    return _bind(cache, table)(query, key, value, seq, decodes, starts[decodes], scale, out)


def paged_decoder(cache: PagedCache, block_table: Any) -> Any:
    """``paged_attention`` bound to ``cache`` and ``block_table`` for steps where request r is query
    row r with one new token: ``step(query, key, value, seq_lens, scale, out) -> out`` (what
    ``paged_decoder.PagedDecoder`` calls). Everything derived from the cache is prepared here."""
    step = _bind(cache, np.ascontiguousarray(block_table, dtype=np.int32))

    def decode(query: Any, key: Any, value: Any, seq_lens: Any, scale: float, out: Any) -> Any:
        seq = np.asarray(seq_lens, dtype=np.int32)
        rows = _arange(seq.size)
        return step(query, key, value, seq, rows, rows, scale, out)

    return decode


def _bind(cache: PagedCache, table: np.ndarray) -> Any:
    """The compiled step over ``cache``: ``step(query, key, value, seq, reqs, rows, scale, out)``
    for requests ``reqs`` (query rows ``rows``), written to ``out[rows]``."""
    h_kv, d = cache.num_kv_heads, cache.head_dim
    k_meta, k_rot, k_pairs, k_sgn = _codec_tables(cache.k_config)
    v_meta, v_rot, v_pairs, v_sgn = _codec_tables(cache.v_config)
    rk32, rk16, kind = _raw_views(cache.raw_k)
    rv32, rv16, _ = _raw_views(cache.raw_v)
    rsb = (np.asarray(cache.raw_slot_of_block, dtype=np.int32) if cache.has_raw
           else _no_raw(cache.num_blocks))
    half, brain = _widen()
    kc, vc = np.asarray(cache.k_cache), np.asarray(cache.v_cache)
    k_chan, v_chan = _channels(cache.k_channels, h_kv, d), _channels(cache.v_channels, h_kv, d)

    def step(query: Any, key: Any, value: Any, seq: np.ndarray, reqs: np.ndarray, rows: np.ndarray,
             scale: float, out: Any) -> Any:
        direct = type(out) is np.ndarray and out.dtype == np.float32
        result = out if direct else np.zeros(out.shape, np.float32)
        _decode_step(reqs, rows, seq, table, kc, vc, rsb, rk32, rk16, rv32, rv16, kind, _float32(query),
                     np.float32(scale), _float32(key), _float32(value), k_meta, k_rot, k_sgn, k_pairs,
                     k_chan, v_meta, v_rot, v_sgn, v_pairs, v_chan, half, brain, result)
        if not direct:
            out[rows] = result[rows].astype(out.dtype)
        return out

    return step


@functools.lru_cache(maxsize=64)
def _arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _no_raw(num_blocks: int) -> np.ndarray:
    return np.full(num_blocks, -1, np.int32)


@functools.lru_cache(maxsize=64)
def _identity(h_kv: int, d: int) -> np.ndarray:
    return np.broadcast_to(np.arange(d, dtype=np.int64), (h_kv, d)).copy()


def _channels(channels: Any, h_kv: int, d: int) -> np.ndarray:
    """[H, d] int64: the model channel at each record position (identity without a split)."""
    return _identity(h_kv, d) if channels is None else np.asarray(channels, dtype=np.int64)


def _float32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)
