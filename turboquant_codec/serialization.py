"""The self-describing byte stream of ``Encoded.to_bytes()`` (all fields little-endian)::

    offset  size  field
    0       4     magic b"TQKV"
    4       2     format version (uint16), currently 4
    6       2     head dimension d (uint16)
    8       1     2 * bits (uint8)
    9       1     mode (0 = mse, 1 = prod)
    10      8     seed (uint64)
    18      1     rotation kind (index into ``config.ROTATIONS``: 0 = haar, 1 = hadamard2, 2 = hadamard)
    19      1     ndim of the record array without its byte axis, k (uint8)
    20      8k    shape (*lead, n) (uint64 each)
    20+8k   1     1 when a channel permutation follows, else 0
    ...           channels: prod(lead) * d uint16 (outlier group first), when present
    ...           records: prod(lead) * n * record_bytes bytes (see ``config`` for one record)
    end-4   4     CRC-32 of every preceding byte

Version 4 added the rotation byte; versions 2 and 3 (no such byte: everything after offset 18 sits
one byte earlier) load as ``rotation="haar"``, the only kind they could hold.
Versions 2 to 4 decode with the float16-grid codebooks of ``codebooks.codec_codebook``; version 1
streams (exact Lloyd-Max centroids, up to 2**-11 apart from those) are refused rather than decoded with
centroids they were not written for. Version 3 stores the record norms as bfloat16 (``config``);
version 2 stored float16, which ``loads`` rounds to bfloat16 (nearest even): a version 2 stream then
decodes as the version 3 stream of the same vectors would, each norm within 2**-8 (relative) of the
float16 one, every code unchanged. Versions 3 and 4 hold bfloat16 norms.

The records are the very bytes the array API and the paged caches hold, so a stream written by any
backend on any machine decodes to the same values.
"""

from __future__ import annotations

import math
import struct
import zlib

import ml_dtypes
import numpy as np

from .config import MODES, ROTATIONS, CodecConfig

MAGIC = b"TQKV"
FORMAT_VERSION = 4
# Versions loads reads; 2 has float16 norms; 2 and 3 have no rotation byte.
READABLE_VERSIONS = (2, 3, 4)
_HEAD = struct.Struct("<4sHHBBQBB")
_HEAD_OLD = struct.Struct("<4sHHBBQB")
_PREFIX = struct.Struct("<4sH")
_CRC = struct.Struct("<I")


def dumps(cfg: CodecConfig, records: np.ndarray, channels: np.ndarray | None) -> bytes:
    """Serialise host arrays; ``records`` (*lead, n, record_bytes) uint8, ``channels`` (*lead, d)."""
    shape = records.shape[:-1]
    parts = [
        _HEAD.pack(MAGIC, FORMAT_VERSION, cfg.d, int(cfg.bits * 2), MODES.index(cfg.mode), cfg.seed,
                   ROTATIONS.index(cfg.rotation), len(shape)),
        struct.pack(f"<{len(shape)}Q", *shape),
        bytes([channels is not None]),
    ]
    if channels is not None:
        parts.append(np.ascontiguousarray(channels, dtype="<u2").tobytes())
    parts.append(np.ascontiguousarray(records, dtype=np.uint8).tobytes())
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def loads(data: bytes) -> tuple[CodecConfig, np.ndarray, np.ndarray | None]:
    """Parse ``dumps`` output; every inconsistency raises ValueError naming it.

    Sizes are checked against the stream's length before anything is allocated, so no header can
    make this hold more than the stream itself. Records must hold what an encoder writes: finite,
    non-negative norms and zero padding.
    """
    data = bytes(data)
    if len(data) < _HEAD_OLD.size + 1 + _CRC.size:
        raise ValueError(f"encoded stream truncated: {len(data)} bytes is shorter than a header")
    magic, version = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a TurboQuant stream: magic {magic!r}, expected {MAGIC!r}")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"encoded stream has format version {version}; this library reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    head = _HEAD if version >= 4 else _HEAD_OLD
    if len(data) < head.size + 1 + _CRC.size:
        raise ValueError(f"encoded stream truncated: {len(data)} bytes is shorter than a header")
    if version >= 4:
        _, _, d, bits2, mode, seed, rotation, ndim = head.unpack_from(data)
    else:
        _, _, d, bits2, mode, seed, ndim = head.unpack_from(data)
        rotation = 0
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    body = data[: -_CRC.size]
    if zlib.crc32(body) != crc:
        raise ValueError("encoded stream is corrupted or truncated: CRC-32 mismatch")
    if mode >= len(MODES):
        raise ValueError(f"encoded stream names unknown mode {mode}")
    if rotation >= len(ROTATIONS):
        raise ValueError(f"encoded stream names unknown rotation kind {rotation}")
    cfg = CodecConfig(d=d, bits=bits2 / 2, mode=MODES[mode], seed=seed, rotation=ROTATIONS[rotation])
    pos = head.size
    if ndim < 1 or len(body) < pos + 8 * ndim + 1:
        raise ValueError(f"encoded stream has a shape of {ndim} dimensions in a {len(body)}-byte body")
    shape = struct.unpack_from(f"<{ndim}Q", body, pos)
    pos += 8 * ndim
    if 0 in shape:
        raise ValueError(f"encoded stream has an empty shape {shape}")
    flag = body[pos]
    pos += 1
    if flag not in (0, 1) or flag != cfg.split:
        raise ValueError(f"encoded stream's channel flag is {flag} but bits={cfg.bits:g} "
                         f"{'splits' if cfg.split else 'does not split'} channels")
    # Python integers: a crafted shape cannot overflow the size it is checked against.
    lead = math.prod(shape[:-1])
    expected = pos + lead * d * 2 * flag + math.prod(shape) * cfg.record_bytes
    if len(body) != expected:
        raise ValueError(f"encoded stream holds {len(body)} bytes, its header describes {expected}")
    channels = None
    if flag:
        channels = np.frombuffer(body, "<u2", lead * d, pos).reshape(*shape[:-1], d).astype(np.uint16)
        pos += lead * d * 2
    records = np.frombuffer(body, np.uint8, offset=pos).reshape(*shape, cfg.record_bytes).copy()
    if version == 2:
        _float16_norms_to_bfloat16(cfg, records)
    _check_records(cfg, records)
    return cfg, records, channels


def norm_bytes(norms: np.ndarray) -> np.ndarray:
    """Little-endian bfloat16 bytes (..., 2k) of non-negative float64 norms (..., k), rounded once to
    nearest even.

    As the kernels' ``d2bf`` (``cuda/tq_common.cuh``): to float32 toward zero with the lost bits ORed
    into its last bit (round to odd, exact for the later rounding to 8 significant bits), then to
    nearest even. Not ``astype(ml_dtypes.bfloat16)``: some ml_dtypes versions convert float64 through
    float32 with two roundings (733.99998687 -> 734.0 -> 736 instead of 732).
    """
    d = np.asarray(norms, np.float64)
    with np.errstate(over="ignore"):
        f = d.astype(np.float32)
    f = np.where(f.astype(np.float64) > d, np.nextafter(f, np.float32(0)), f)
    u = f.view(np.uint32) | (f.astype(np.float64) != d).astype(np.uint32)
    words = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2")
    return words.view(np.uint8)


def _float16_norms_to_bfloat16(cfg: CodecConfig, records: np.ndarray) -> None:
    """Rewrite in place the leading norms of version 2 records (float16) as bfloat16."""
    span = 2 * len(cfg.groups) * cfg.norms_per_group
    halves = records[..., :span].copy().view("<f2").astype(np.float64)
    records[..., :span] = norm_bytes(halves)


def _check_records(cfg: CodecConfig, records: np.ndarray) -> None:
    """ValueError unless every record's norms are finite and >= 0 and its padding is zero."""
    flat = records.reshape(-1, cfg.record_bytes)
    n_norms = len(cfg.groups) * cfg.norms_per_group
    norms = np.ascontiguousarray(flat[:, : 2 * n_norms]).view("<u2").view(ml_dtypes.bfloat16)
    bad = ~(np.isfinite(norms) & (norms >= 0))
    if bad.any():
        i, j = (int(a[0]) for a in np.nonzero(bad))
        raise ValueError(f"encoded stream's record {i} holds norm {float(norms[i, j])!r} (norms are "
                         f"finite and non-negative)")
    used = max(max(g.code_offset + g.code_bytes, g.sign_offset + g.sign_bytes) for g in cfg.groups)
    if flat[:, used:].any():
        i = int(np.nonzero(flat[:, used:].any(axis=1))[0][0])
        raise ValueError(f"encoded stream's record {i} has non-zero padding bytes")
