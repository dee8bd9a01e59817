"""Numba on the host: the paged decode step, reading the codes in place (serving on CPU).

Serves ``paged_attention`` (mode "mse" K and V; ``capabilities`` says so, everything else falls to
the NumPy reference). Decode requests (one new token) run one compiled task per (request, KV head),
spread over the cores; prefill requests go through the reference's dense path in float32, whose
products are BLAS matrix products.

Per task, for the ``G`` query heads of one KV head (the query rotated and permuted once, on the
host, into record order; ``scale`` folded in)::

    score(token)  = sum_groups |x_g| * <q_rot_g, centroid[codes_g]>     codes read from the record
                  = <q, k_raw>                                          raw pool / new token
    acc_rot      += p * |x_g| * centroid[codes_g]    (rotated domain, record order)
    acc_raw      += p * v_raw                        (model domain, channel order)
    out           = (unpermute(acc_rot_g @ R_g) + acc_raw) / sum(p)     one un-rotation per head

Records follow ``config``'s byte layout; bfloat16 norms and 16-bit raw pools are widened through a
65536-entry table (exact). Float32 throughout; results match the float64 reference to float32
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

MAX_GROUPS = 2
MAX_CODES = 16


def availability() -> Availability:
    return Availability(not _IMPORT_ERROR, _IMPORT_ERROR)


asarray = numpy_ref.asarray


# ------------------------------------------------------------------------------------------ tables
@functools.lru_cache(maxsize=64)
def _codec_tables(cfg: CodecConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``meta`` [groups, 4] (dim, code bits, code offset, norm offset), ``rot`` [groups, g, g]
    float32 and ``cent`` [groups, 16] float32 of one configuration."""
    groups, tabs = cfg.groups, tables(cfg)
    g_max = max(g.dim for g in groups)
    meta = np.array([[g.dim, g.code_bits, g.code_offset, g.norm_offset] for g in groups], np.int64)
    rot = np.zeros((len(groups), g_max, g_max), np.float32)
    cent = np.zeros((len(groups), MAX_CODES), np.float32)
    for i, (g, t) in enumerate(zip(groups, tabs, strict=True)):
        rot[i, : g.dim, : g.dim] = t.rotation
        cent[i, : t.centroids.size] = t.centroids
    return meta, rot, cent


@functools.cache
def _widen() -> tuple[np.ndarray, np.ndarray]:
    """float32 values of every float16 and every bfloat16 bit pattern."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    half = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    brain = (bits << 16).view(np.float32)
    return half, brain


def _rotate_queries(q: np.ndarray, cfg: CodecConfig, channels: np.ndarray | None) -> np.ndarray:
    """q [N, H, G, d] float64 -> permuted into record order and rotated per group, float32."""
    if channels is not None:
        q = np.take_along_axis(q, channels.astype(np.intp)[None, :, None, :], axis=-1)
    parts, start = [], 0
    for g, t in zip(cfg.groups, tables(cfg), strict=True):
        parts.append(q[..., start : start + g.dim] @ t.rotation.T)
        start += g.dim
    return np.ascontiguousarray(np.concatenate(parts, axis=-1), dtype=np.float32)


def _raw_views(pool: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """A raw pool as (float32 view, uint16 view, kind): kind 0 reads the first, 1 / 2 widen the
    second as float16 / bfloat16; the unused one is a placeholder of the same rank."""
    placeholder32, placeholder16 = np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.uint16)
    if pool is None:
        return placeholder32, placeholder16, 0
    name = str(pool.dtype)
    if name == "float32":
        return pool, placeholder16, 0
    return placeholder32, pool.view(np.uint16), 1 if name == "float16" else 2


# ------------------------------------------------------------------------------------------ kernel
if not _IMPORT_ERROR:

    @njit(inline="always", cache=True)
    def _norm(rec: Any, at: int, brain: np.ndarray) -> float:
        return brain[np.int64(rec[at]) | (np.int64(rec[at + 1]) << 8)]

    @njit(inline="always", cache=True)
    def _rotated(rec: Any, meta: np.ndarray, cent: np.ndarray, brain: np.ndarray, out: np.ndarray) -> None:
        """Dequantised rotated coordinates of one record, in record order, norms applied."""
        j = 0
        for gi in range(meta.shape[0]):
            dim, bits, code_at, norm_at = meta[gi, 0], meta[gi, 1], meta[gi, 2], meta[gi, 3]
            norm = _norm(rec, norm_at, brain)
            mask = (1 << bits) - 1
            for c in range(dim):
                bit = c * bits
                byte = code_at + (bit >> 3)
                word = np.int64(rec[byte])
                if (bit & 7) + bits > 8:
                    word |= np.int64(rec[byte + 1]) << 8
                out[j] = cent[gi, (word >> (bit & 7)) & mask] * norm
                j += 1

    @njit(inline="always", cache=True)
    def _raw(pool32: np.ndarray, pool16: np.ndarray, kind: int, row: int, off: int, h: int, c: int,
             half: np.ndarray, brain: np.ndarray) -> float:
        if kind == 0:
            return pool32[row, off, h, c]
        if kind == 1:
            return half[pool16[row, off, h, c]]
        return brain[pool16[row, off, h, c]]

    @njit(parallel=True, fastmath=True, cache=True)
    def _decode_step(reqs, rows, seq, table, kc, vc, rsb, rk32, rk16, rv32, rv16, kind,  # noqa: ANN001
                     q_rot, q_raw, k_new, v_new, k_meta, k_cent, v_meta, v_rot, v_cent, v_chan,
                     half, brain, out):
        """out [N, H, G, d] float32 of N decode requests (request ids ``reqs``, query rows ``rows``)."""
        n_dec, n_heads, n_group, d = q_rot.shape
        num_blocks, block_size = kc.shape[0], kc.shape[1]
        for task in prange(n_dec * n_heads):
            i, h = task // n_heads, task % n_heads
            r = reqs[i]
            ctx = seq[r] - 1
            s = np.empty((n_group, ctx + 1), np.float32)
            kv = np.empty(d, np.float32)
            for t in range(ctx):
                blk = table[r, t // block_size]
                off = t % block_size
                if blk < 0 or blk >= num_blocks:
                    for g in range(n_group):
                        s[g, t] = -np.inf
                    continue
                raw = rsb[blk]
                if raw >= 0:
                    for c in range(d):
                        kv[c] = _raw(rk32, rk16, kind, raw, off, h, c, half, brain)
                    for g in range(n_group):
                        acc = np.float32(0.0)
                        for c in range(d):
                            acc += q_raw[i, h, g, c] * kv[c]
                        s[g, t] = acc
                else:
                    _rotated(kc[blk, off, h], k_meta, k_cent, brain, kv)
                    for g in range(n_group):
                        acc = np.float32(0.0)
                        for c in range(d):
                            acc += q_rot[i, h, g, c] * kv[c]
                        s[g, t] = acc
            for g in range(n_group):
                acc = np.float32(0.0)
                for c in range(d):
                    acc += q_raw[i, h, g, c] * k_new[rows[i], h, c]
                s[g, ctx] = acc
            total = np.zeros(n_group, np.float32)
            for g in range(n_group):
                top = s[g].max()
                for t in range(ctx + 1):
                    p = np.exp(s[g, t] - top)
                    s[g, t] = p
                    total[g] += p
            acc_rot = np.zeros((n_group, d), np.float32)
            acc_raw = np.zeros((n_group, d), np.float32)
            for t in range(ctx):
                blk = table[r, t // block_size]
                off = t % block_size
                if blk < 0 or blk >= num_blocks:
                    continue
                raw = rsb[blk]
                if raw >= 0:
                    for c in range(d):
                        kv[c] = _raw(rv32, rv16, kind, raw, off, h, c, half, brain)
                    for g in range(n_group):
                        for c in range(d):
                            acc_raw[g, c] += s[g, t] * kv[c]
                else:
                    _rotated(vc[blk, off, h], v_meta, v_cent, brain, kv)
                    for g in range(n_group):
                        for c in range(d):
                            acc_rot[g, c] += s[g, t] * kv[c]
            for g in range(n_group):
                for c in range(d):
                    acc_raw[g, c] += s[g, ctx] * v_new[rows[i], h, c]
            # Un-rotate per group (decode is y @ R), then scatter through the value channels.
            for g in range(n_group):
                start = 0
                for gi in range(v_meta.shape[0]):
                    dim = v_meta[gi, 0]
                    for c in range(dim):
                        x = np.float32(0.0)
                        for j in range(dim):
                            x += acc_rot[g, start + j] * v_rot[gi, j, c]
                        out[i, h, g, v_chan[h, start + c]] = (x + acc_raw[g, v_chan[h, start + c]]) / total[g]
                    start += dim


# ---------------------------------------------------------------------------------------------- op
def paged_attention(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                    query_start_loc: Any, scale: float, out: Any, num_decodes: int | None) -> Any:
    """As ``numpy_ref.paged_attention``; decode requests run the compiled step above."""
    starts = np.asarray(query_start_loc).astype(np.int64)
    seq = np.asarray(seq_lens).astype(np.int64)
    table = np.ascontiguousarray(block_table, dtype=np.int64)
    q_lens = np.diff(starts)
    decodes = np.flatnonzero(q_lens == 1)
    for r in np.flatnonzero(q_lens > 1):
        numpy_ref.attend_request(cache, query, key, value, table[r], int(seq[r]),
                                 slice(int(starts[r]), int(starts[r + 1])), scale, out, np.float32)
    if decodes.size == 0:
        return out
    rows = starts[decodes]
    h_q, h_kv, d = query.shape[1], key.shape[1], key.shape[2]
    q = np.asarray(query[rows]).astype(np.float64).reshape(rows.size, h_kv, h_q // h_kv, d) * scale
    k_ch = None if cache.k_channels is None else np.asarray(cache.k_channels)
    v_ch = (np.asarray(cache.v_channels).astype(np.int64) if cache.v_channels is not None
            else np.broadcast_to(np.arange(d, dtype=np.int64), (h_kv, d)).copy())
    k_meta, _, k_cent = _codec_tables(cache.k_config)
    v_meta, v_rot, v_cent = _codec_tables(cache.v_config)
    rk32, rk16, kind = _raw_views(cache.raw_k)
    rv32, rv16, _ = _raw_views(cache.raw_v)
    rsb = (np.asarray(cache.raw_slot_of_block).astype(np.int64) if cache.has_raw
           else np.full(cache.num_blocks, -1, np.int64))
    half, brain = _widen()
    result = np.empty((rows.size, h_kv, h_q // h_kv, d), np.float32)
    _decode_step(decodes, rows, seq, table, np.asarray(cache.k_cache), np.asarray(cache.v_cache), rsb,
                 rk32, rk16, rv32, rv16, kind, _rotate_queries(q, cache.k_config, k_ch),
                 q.astype(np.float32), _float32(key), _float32(value), k_meta, k_cent, v_meta, v_rot,
                 v_cent, v_ch, half, brain, result)
    out[rows] = result.reshape(rows.size, h_q, d).astype(out.dtype)
    return out


def _float32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)

