"""NumPy reference backend: the ground truth every other backend is tested against.

Vectorised over all vectors (the only Python loops run over the at most two channel groups), computed
in float64 from the host tables of ``transforms``. Record layout: see ``turboquant_codec.config``.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from .._ops import Availability
from ..config import NORM_LIMIT, CodecConfig, Group, norm_range_error
from ..encoded import Encoded
from ..paged_cache import PagedCache
from ..serialization import norm_bytes
from ..transforms import GroupTables, rotate, tables


def availability() -> Availability:
    return Availability(True)


def asarray(x: Any) -> np.ndarray:
    from .._interop import to_numpy

    return to_numpy(x)


# ----------------------------------------------------------------------------------------- records
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints (..., g) of ``bits`` bits into an LSB-first byte stream (..., g*bits/8)."""
    planes = (values[..., None].astype(np.uint16) >> np.arange(bits, dtype=np.uint16)) & 1
    flat = planes.astype(np.uint8).reshape(*values.shape[:-1], -1)
    return np.packbits(flat, axis=-1, bitorder="little")


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: (..., count*bits/8) bytes -> (..., count) int64."""
    planes = np.unpackbits(stream, axis=-1, count=count * bits, bitorder="little")
    planes = planes.reshape(*stream.shape[:-1], count, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(-1)


def _norms(records: np.ndarray, g: Group, which: int) -> np.ndarray:
    """bfloat16 norm ``which`` (0: |x_g|, 1: residual) of group ``g`` as float64 (..., n)."""
    at = g.norm_offset + 2 * which
    words = records[..., at : at + 2].copy().view("<u2")[..., 0]
    return words.view(ml_dtypes.bfloat16).astype(np.float64)


def _codes(records: np.ndarray, g: Group) -> np.ndarray:
    return unpack_bits(records[..., g.code_offset : g.code_offset + g.code_bytes], g.code_bits, g.dim)


def _signs(records: np.ndarray, g: Group) -> np.ndarray:
    """QJL signs of group ``g`` as +-1.0 (..., n, g)."""
    bits = unpack_bits(records[..., g.sign_offset : g.sign_offset + g.sign_bytes], 1, g.dim)
    return 2.0 * bits - 1.0


# ---------------------------------------------------------------------------------------- channels
def select_channels(x: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    """Per stream, the ``d/2`` channels of largest mean square first, then the rest; each ascending."""
    energy = np.mean(np.square(x, dtype=np.float64), axis=-2)
    # Stable sort on -energy: ties go to the lower channel index, so the choice is deterministic.
    order = np.argsort(-energy, axis=-1, kind="stable")
    top = np.sort(order[..., : cfg.outlier_dim], axis=-1)
    rest = np.sort(order[..., cfg.outlier_dim :], axis=-1)
    return np.concatenate([top, rest], axis=-1).astype(np.uint16)


def _permute(x: np.ndarray, channels: np.ndarray | None) -> np.ndarray:
    """Channels of ``x`` (..., n, d) in record order."""
    if channels is None:
        return x
    return np.take_along_axis(x, channels[..., None, :].astype(np.intp), axis=-1)


def _unpermute(x: np.ndarray, channels: np.ndarray | None) -> np.ndarray:
    if channels is None:
        return x
    out = np.empty_like(x)
    np.put_along_axis(out, np.broadcast_to(channels[..., None, :].astype(np.intp), x.shape), x, axis=-1)
    return out


def _slices(cfg: CodecConfig) -> list[tuple[Group, GroupTables, slice]]:
    out, start = [], 0
    for g, t in zip(cfg.groups, tables(cfg), strict=True):
        out.append((g, t, slice(start, start + g.dim)))
        start += g.dim
    return out


# --------------------------------------------------------------------------------------------- ops
def encode(x: np.ndarray, cfg: CodecConfig, channels: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """Records (..., n, record_bytes) uint8 of x (..., n, d), and the channel permutation used.

    Per group: y = R x_g / |x_g| (``transforms.rotate``: dense, or fast for the Hadamard kinds),
    code = number of boundaries strictly below y; prod mode adds the
    signs of S (y - centroid[code]) and the residual norm.
    """
    x = np.asarray(x).astype(np.float64)
    if cfg.split and channels is None:
        channels = select_channels(x, cfg)
    xp = _permute(x, channels)
    records = np.zeros(x.shape[:-1] + (cfg.record_bytes,), np.uint8)
    for g, t, cols in _slices(cfg):
        part = xp[..., cols]
        norm = np.linalg.norm(part, axis=-1)
        if np.any(norm >= NORM_LIMIT):
            raise norm_range_error(int(np.sum(norm >= NORM_LIMIT)))
        y = rotate(part, t) / np.where(norm > 0, norm, 1.0)[..., None]
        code = np.searchsorted(t.boundaries, y)
        records[..., g.code_offset : g.code_offset + g.code_bytes] = pack_bits(code, g.code_bits)
        stored = [norm]
        if g.qjl:
            assert t.projection is not None
            residual = y - t.centroids[code]
            stored.append(np.linalg.norm(residual, axis=-1) * norm)
            signs = (residual @ t.projection.T >= 0).astype(np.uint8)
            records[..., g.sign_offset : g.sign_offset + g.sign_bytes] = pack_bits(signs, 1)
        words = norm_bytes(np.stack(stored, axis=-1))
        records[..., g.norm_offset : g.norm_offset + words.shape[-1]] = words
    return records, channels


def _rotated(records: np.ndarray, g: Group, t: GroupTables) -> np.ndarray:
    """Dequantised rotated-domain vectors of one group, norms applied: (..., n, g)."""
    y = t.centroids[_codes(records, g)] * _norms(records, g, 0)[..., None]
    if g.qjl:
        assert t.projection is not None
        gamma = _norms(records, g, 1)[..., None] * t.qjl_scale
        y = y + gamma * (_signs(records, g) @ t.projection)
    return y


def decode(enc: Encoded) -> np.ndarray:
    """(..., n, d) float32: per group R^T (|x_g| centroid[code] (+ QJL term)), unpermuted."""
    records = np.asarray(enc.records)
    parts = [rotate(_rotated(records, g, t), t, inverse=True) for g, t, _ in _slices(enc.config)]
    x = np.concatenate(parts, axis=-1)
    return _unpermute(x, enc.channels).astype(np.float32)


def _scores64(q: np.ndarray, keys: Encoded) -> np.ndarray:
    records = np.asarray(keys.records)
    qp = _permute(np.asarray(q).astype(np.float64), keys.channels)
    s = 0.0
    for g, t, cols in _slices(keys.config):
        q_rot = rotate(qp[..., cols], t)
        s = s + np.einsum("...mg,...ng->...mn", q_rot, _rotated(records, g, t))
    return np.asarray(s)


def scores(q: np.ndarray, keys: Encoded) -> np.ndarray:
    """(..., m, n) float32: the query rotated once per group against the dequantised codes."""
    return _scores64(q, keys).astype(np.float32)


def attention(
    q: np.ndarray,
    k: Encoded,
    v: Encoded,
    scale: float,
    k_tail: np.ndarray | None,
    v_tail: np.ndarray | None,
) -> np.ndarray:
    """(..., h_q, d) float32: one float64 softmax over compressed and tail tokens, GQA by groups."""
    *lead, h_q, d = q.shape
    h_kv = k.shape[-3]
    qg = np.asarray(q).astype(np.float64).reshape(*lead, h_kv, h_q // h_kv, d)
    logits = _scores64(qg, k)
    values = decode(v).astype(np.float64)
    if k_tail is not None and v_tail is not None:
        tail_logits = np.einsum("...gd,...td->...gt", qg, np.asarray(k_tail).astype(np.float64))
        logits = np.concatenate([logits, tail_logits], axis=-1)
        values = np.concatenate([values, np.asarray(v_tail).astype(np.float64)], axis=-2)
    # Scaled once the maximum is out: a huge finite scale then sends the other logits to -inf
    # instead of the largest to inf (and inf - inf).
    with np.errstate(over="ignore"):
        weights = np.exp((logits - logits.max(axis=-1, keepdims=True)) * scale)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights @ values
    return out.reshape(*lead, h_q, d).astype(np.float32)


# ------------------------------------------------------------------------------------------- paged
def _valid_slots(slot_mapping: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the new tokens that are not padding, and their slots (int64)."""
    slots = np.asarray(slot_mapping).astype(np.int64)
    rows = np.flatnonzero(slots >= 0)
    return rows, slots[rows]


def _raw_rows(cache: PagedCache, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of the physical ``blocks`` have a raw row, and the rows (int64, same shape).

    ``PagedCache``'s rule: a ``raw_slot_of_block`` entry outside 0 .. num_raw_blocks - 1 (-1, or
    past the pool) is no raw row.
    """
    rows = np.asarray(cache.raw_slot_of_block)[blocks].astype(np.int64)
    return (rows >= 0) & (rows < np.asarray(cache.raw_k).shape[0]), rows


def paged_write(cache: PagedCache, key: Any, value: Any, slot_mapping: Any) -> tuple[Any, Any]:
    """Encode the new tokens [T, H, d] into their slots (and raw rows); the channels used.

    One stream per KV head: ``channels`` None picks each head's outlier channels from this batch.
    """
    rows, slots = _valid_slots(slot_mapping)
    channels = [cache.k_channels, cache.v_channels]
    if rows.size == 0:
        return channels[0], channels[1]
    blocks, offsets = np.divmod(slots, cache.block_size)
    for i, (x, records_out, cfg) in enumerate(
        ((key, cache.k_cache, cache.k_config), (value, cache.v_cache, cache.v_config))
    ):
        heads_first = np.asarray(x)[rows].transpose(1, 0, 2)  # [H, N, d]
        records, channels[i] = encode(heads_first, cfg, channels[i])
        records_out[blocks, offsets] = records.transpose(1, 0, 2)
    if cache.has_raw:
        keep, raw_rows = _raw_rows(cache, blocks)
        for raw, x in ((cache.raw_k, key), (cache.raw_v, value)):
            raw[raw_rows[keep], offsets[keep]] = np.asarray(x)[rows[keep]].astype(raw.dtype)
    return channels[0], channels[1]


def _context(cache: PagedCache, table_row: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One request's first ``length`` cached tokens as float64 K, V [H, length, d]."""
    pos = np.arange(length)
    blocks, offsets = table_row[pos // cache.block_size].astype(np.int64), pos % cache.block_size
    kv = []
    for records, cfg, channels in ((cache.k_cache, cache.k_config, cache.k_channels),
                                   (cache.v_cache, cache.v_config, cache.v_channels)):
        heads_first = np.asarray(records)[blocks, offsets].transpose(1, 0, 2)  # [H, length, R]
        kv.append(decode(Encoded(records=np.ascontiguousarray(heads_first), channels=channels,
                                 config=cfg)).astype(np.float64))
    if cache.has_raw:
        has, raw_rows = _raw_rows(cache, blocks)
        raw = np.flatnonzero(has)
        for out, pool in zip(kv, (cache.raw_k, cache.raw_v), strict=True):
            out[:, raw] = np.asarray(pool)[raw_rows[raw], offsets[raw]].astype(np.float64).transpose(1, 0, 2)
    return kv[0], kv[1]


def attend_request(cache: PagedCache, query: Any, key: Any, value: Any, table_row: np.ndarray, seq_len: int,
                   rows: slice, scale: float, out: Any, dtype: Any = np.float64) -> None:
    """One request's causal attention (query rows ``rows``), written to ``out[rows]``.

    Computed in ``dtype``: float64 for the reference, float32 where a host backend reuses it (the
    products run as batched matrix products either way).
    """
    h_q, h_kv, d = query.shape[1], key.shape[1], key.shape[2]
    group, n = h_q // h_kv, rows.stop - rows.start
    ctx = seq_len - n
    k_ctx, v_ctx = _context(cache, table_row, ctx)
    k_all = np.concatenate([k_ctx.astype(dtype), np.asarray(key[rows]).astype(dtype).transpose(1, 0, 2)], 1)
    v_all = np.concatenate([v_ctx.astype(dtype), np.asarray(value[rows]).astype(dtype).transpose(1, 0, 2)], 1)
    # Query rows of one KV head's group stacked: [H, G * n, d].
    q = np.asarray(query[rows]).astype(dtype).reshape(n, h_kv, group, d).transpose(1, 2, 0, 3)
    logits = (q.reshape(h_kv, group * n, d) @ k_all.transpose(0, 2, 1)).reshape(h_kv, group, n, ctx + n)
    causal = np.arange(ctx + n)[None, :] <= ctx + np.arange(n)[:, None]  # [n, L]
    logits += np.where(causal, 0.0, -np.inf).astype(dtype)
    logits -= logits.max(axis=-1, keepdims=True)
    # Scaled once the maximum is out (as ``attention``), by at most the dtype's largest number.
    with np.errstate(over="ignore"):
        logits *= dtype(min(scale, float(np.finfo(dtype).max)))
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    result = (logits.reshape(h_kv, group * n, ctx + n) @ v_all).reshape(h_kv, group, n, d)
    out[rows] = result.transpose(2, 0, 1, 3).reshape(n, h_q, d).astype(out.dtype)


def paged_attention(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                    query_start_loc: Any, scale: float, out: Any, num_decodes: int | None) -> Any:
    """Causal attention of each request over its cached context and its own new tokens, in float64.

    Context tokens come raw where their block has a raw row, else decoded; the new tokens come raw
    from ``key``/``value``. ``num_decodes`` changes nothing here (every request takes one path).
    """
    starts = np.asarray(query_start_loc).astype(np.int64)
    seq = np.asarray(seq_lens).astype(np.int64)
    table = np.asarray(block_table)
    for r in range(seq.shape[0]):
        if starts[r + 1] > starts[r]:
            attend_request(cache, query, key, value, table[r], int(seq[r]),
                           slice(int(starts[r]), int(starts[r + 1])), scale, out)
    return out
