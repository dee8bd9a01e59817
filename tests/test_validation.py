"""One set of input rules (``turboquant_codec._validate``) at every entry point: the codec API, the
paged ops and the byte stream. Each bad input is a TypeError (wrong kind) or ValueError (wrong
value) naming the argument; valid look-alikes (NumPy integer seeds) give the same result as plain ones.
"""

from __future__ import annotations

import struct
import zlib

import ml_dtypes
import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import CodecConfig, PagedCache, serialization
from turboquant_codec.paged import check_write

# (value, exception) for an argument that must be an integer in a range.
BAD_SEEDS = [(True, TypeError), (np.bool_(True), TypeError), (1.9, TypeError), (3.0, TypeError),
             ("3", TypeError), (None, TypeError), (2**64, ValueError), (-1, ValueError)]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 10, 64)).astype(np.float32)


@pytest.mark.parametrize(("seed", "error"), BAD_SEEDS, ids=repr)
def test_bad_seed_is_refused_everywhere(x: np.ndarray, seed: object, error: type) -> None:
    for call in (lambda: tq.encode(x, seed=seed), lambda: CodecConfig(64, 3, seed=seed),
                 lambda: tq.stream_seed(seed, 0)):
        with pytest.raises(error, match="seed must be an integer"):
            call()


def test_numpy_integer_seeds_equal_python_ints(x: np.ndarray) -> None:
    for seed in (np.int64(7), np.uint64(7), np.int32(7)):
        enc = tq.encode(x, bits=3.5, seed=seed)
        assert type(enc.seed) is int and enc.config == CodecConfig(64, 3.5, seed=7)
        assert np.array_equal(enc.records, tq.encode(x, bits=3.5, seed=7).records)
    big = tq.encode(x, bits=3, seed=np.uint64(2**64 - 1))
    assert big.seed == 2**64 - 1 and not np.array_equal(big.records, tq.encode(x, bits=3, seed=0).records)
    assert tq.stream_seed(np.int64(5), np.int32(2)) == tq.stream_seed(5, 2)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"bits": "3.5"}, TypeError, "bits must be a real number"),
    ({"bits": True}, TypeError, "bits must be a real number"),
    ({"bits": np.float32(3.5)}, None, None),
    ({"d": 64.0}, TypeError, "d must be an integer"),
    ({"d": 64.9}, TypeError, "d must be an integer"),
    ({"d": True}, TypeError, "d must be an integer"),
    ({"d": np.int64(64)}, None, None),
    ({"mode": 1}, ValueError, "mode must be one of"),
], ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v))
def test_config_scalars(kwargs: dict, error: type | None, message: str | None) -> None:
    args = {"d": 64, "bits": 3.5, "mode": "mse", **kwargs}
    if error is None:
        cfg = CodecConfig(**args)
        assert (type(cfg.d), type(cfg.bits)) == (int, float) and cfg == CodecConfig(64, 3.5)
        assert hash(cfg) == hash(CodecConfig(64, 3.5))
        return
    with pytest.raises(error, match=message):
        CodecConfig(**args)


@pytest.mark.parametrize(("scale", "error"), [(float("inf"), ValueError), (float("nan"), ValueError),
                                              (0.0, ValueError), (-0.1, ValueError), ("0.1", TypeError),
                                              (True, TypeError)], ids=repr)
def test_bad_scale(x: np.ndarray, scale: object, error: type) -> None:
    enc = tq.encode(x)
    with pytest.raises(error, match="scale must be a"):
        tq.attention(x[:, 0], enc, enc, scale=scale)


def test_numpy_scale_is_a_scale(x: np.ndarray) -> None:
    enc = tq.encode(x)
    np.testing.assert_array_equal(tq.attention(x[:, 0], enc, enc, scale=np.float32(0.125)),
                                  tq.attention(x[:, 0], enc, enc, scale=0.125))


@pytest.mark.parametrize("which", ["k_tail", "v_tail"])
def test_non_finite_tail(x: np.ndarray, which: str) -> None:
    enc = tq.encode(x)
    tails = {"k_tail": x[:, :3].copy(), "v_tail": x[:, :3].copy()}
    tails[which][1, 2, 5] = np.nan
    with pytest.raises(ValueError, match=rf"{which} holds 1 NaN/Inf values; the first at index \(1, 2, 5\)"):
        tq.attention(x[:, 0], enc, enc, scale=0.125, **tails)
    out = tq.attention(x[:, 0], enc, enc, scale=0.125, check_finite=False, **tails)
    assert np.isfinite(out[0]).all() and not np.isfinite(out[1]).all()  # only the bad stream


@pytest.mark.parametrize("op", ["decode", "scores", "attention"])
@pytest.mark.parametrize("how", ["zeros", "shifted", "repeated"])
def test_channel_lists_that_are_not_permutations(x: np.ndarray, op: str, how: str) -> None:
    enc = tq.encode(x, bits=3.5)
    ch = enc.channels.astype(np.int64)
    bad = {"zeros": np.zeros_like(ch), "shifted": ch + 1, "repeated": np.where(ch == 5, 6, ch)}[how]
    with pytest.raises(ValueError, match="channels must hold a permutation of 0..63"):
        forged = tq.Encoded(enc.records, bad.astype(np.uint16), enc.config)
        {"decode": lambda: tq.decode(forged), "scores": lambda: tq.scores(x[:, :2], forged),
         "attention": lambda: tq.attention(x[:, 0], forged, forged, scale=0.1)}[op]()


# ------------------------------------------------------------------------------------------ bytes
_HEAD = struct.Struct("<4sHHBBQBB")  # the current version's header (rotation byte before ndim)


def _sealed(body: bytes) -> bytes:
    """``body`` with a valid CRC: what a crafted (not merely corrupted) stream looks like."""
    return body + struct.pack("<I", zlib.crc32(body))


def _header(d: int = 64, bits: float = 3.0, ndim: int = 2,
            version: int = serialization.FORMAT_VERSION) -> bytes:
    return _HEAD.pack(serialization.MAGIC, version, d, int(2 * bits), 0, 0, 0, ndim)


def _records_at(enc: tq.Encoded) -> int:
    """Byte offset of the first record in ``enc.to_bytes()``."""
    ndim = enc.records.ndim - 1
    channels = 0 if enc.channels is None else enc.channels.size * 2
    return _HEAD.size + 8 * ndim + 1 + channels


def _patched(enc: tq.Encoded, offset: int, data: bytes) -> bytes:
    body = bytearray(enc.to_bytes()[:-4])
    body[offset : offset + len(data)] = data
    return _sealed(bytes(body))


@pytest.mark.parametrize(("stream", "message"), [
    (_header(ndim=2) + struct.pack("<2Q", 2, 0) + b"\0", "empty shape"),
    (_header(ndim=2) + struct.pack("<2Q", 0, 5) + b"\0", "empty shape"),
    (_header(ndim=0) + b"\0", "shape of 0 dimensions"),
    (_header(ndim=200) + b"\0" * 9, "shape of 200 dimensions"),
    (_header(ndim=1) + struct.pack("<Q", 1), "shape of 1 dimensions"),  # no channel flag byte
    (_header(ndim=2) + struct.pack("<2Q", 2**40, 2**40) + b"\0", "header describes"),
    (_header(ndim=3) + struct.pack("<3Q", 2**63, 2**63, 4) + b"\0", "header describes"),
    (_header(ndim=1) + struct.pack("<Q", 1) + b"\2" + bytes(28), "channel flag is 2"),
    (_header(ndim=1) + struct.pack("<Q", 1) + b"\1" + bytes(28), "channel flag is 1 but bits=3 does not"),
    (_header(bits=3.5, ndim=1) + struct.pack("<Q", 1) + b"\0" + bytes(32), "channel flag is 0 but bits=3.5"),
    (_header(d=0, ndim=1) + struct.pack("<Q", 1) + b"\0", "head dimension d=0"),
    (_header(version=1, ndim=1) + struct.pack("<Q", 1) + b"\0" + bytes(28), "format version 1"),
], ids=["n=0", "lead=0", "ndim=0", "ndim=200", "no-flag", "huge", "overflow", "flag=2", "flag-int-bits",
        "no-flag-split", "d=0", "version-1"])
def test_crafted_headers_are_value_errors(stream: bytes, message: str) -> None:
    """Valid CRC, inconsistent header: a ValueError, never struct.error / ZeroDivisionError, and
    no allocation beyond the stream (the 2**80-record shapes would need yottabytes)."""
    with pytest.raises(ValueError, match=message):
        tq.Encoded.from_bytes(_sealed(stream))


@pytest.mark.parametrize(("norm", "mode"), [(np.nan, "mse"), (np.inf, "mse"), (-1.0, "mse"),
                                            (-np.inf, "prod")], ids=["nan", "inf", "negative", "-inf-prod"])
def test_impossible_norms(x: np.ndarray, norm: float, mode: str) -> None:
    enc = tq.encode(x, bits=3.5, mode=mode)
    last = enc.config.norms_per_group * len(enc.config.groups) - 1  # the last norm of the record
    at = _records_at(enc) + 3 * enc.config.record_bytes + 2 * last
    with pytest.raises(ValueError, match="record 3 holds norm"):
        tq.Encoded.from_bytes(_patched(enc, at, np.array(norm, ml_dtypes.bfloat16).tobytes()))


def test_non_zero_padding(x: np.ndarray) -> None:
    enc = tq.encode(x, bits=3)  # d=64, 3 bits: 2 + 24 bytes used of 28
    assert enc.config.record_bytes == 28
    at = _records_at(enc) + 5 * 28 + 26
    with pytest.raises(ValueError, match="record 5 has non-zero padding"):
        tq.Encoded.from_bytes(_patched(enc, at, b"\x80"))
    assert tq.Encoded.from_bytes(_patched(enc, at, b"\0")).config == enc.config


def test_repr_of_every_parsed_stream_works(x: np.ndarray) -> None:
    enc = tq.Encoded.from_bytes(tq.encode(x[:, :1], bits=2.5, mode="prod").to_bytes())
    assert "shape=(2, 1, 64)" in repr(enc)


# ------------------------------------------------------------------------------------ paged (host)
H, BS, NB = 2, 16, 4


def _cache(bits: float = 3.0) -> PagedCache:
    k, v = CodecConfig(64, bits, seed=1), CodecConfig(64, bits, seed=2)
    return PagedCache(np.zeros((NB, BS, H, k.record_bytes), np.uint8),
                      np.zeros((NB, BS, H, v.record_bytes), np.uint8), k, v)


@pytest.mark.parametrize(("slots", "error", "message"), [
    (np.array([1, NB * BS]), ValueError, "slot_mapping holds slot 64"),
    (np.array([1.0, 2.0]), TypeError, "slot_mapping must be an integer array"),
    (np.array([[1, 2]]), ValueError, "slot_mapping must have 1 dimension"),
    (np.array([1, 2, 3]), ValueError, "3 entries but only 2 new tokens"),
])
def test_check_write_refuses_before_anything(slots: np.ndarray, error: type, message: str) -> None:
    cache = _cache(3.5)
    key = np.ones((2, H, 64), np.float32)
    for call in (lambda: check_write(cache, key, key, slots), lambda: tq.paged_write(cache, key, key, slots)):
        with pytest.raises(error, match=message):
            call()
    assert not cache.k_cache.any() and not cache.v_cache.any()


@pytest.mark.parametrize(("num_decodes", "error"), [(True, TypeError), (1.0, TypeError), (3, ValueError),
                                                    (-1, ValueError)], ids=repr)
def test_num_decodes(num_decodes: object, error: type) -> None:
    cache = _cache()
    key = np.random.default_rng(1).standard_normal((2, H, 64)).astype(np.float32)
    cache = tq.paged_write(cache, key, key, np.array([0, 16]))
    args = (cache, np.ones((2, 2 * H, 64), np.float32), key, key, np.array([[0], [1]], np.int32),
            np.array([2, 2], np.int32), np.array([0, 1, 2], np.int32))
    with pytest.raises(error, match="num_decodes must be an integer"):
        tq.paged_attention(*args, scale=0.125, num_decodes=num_decodes)
    ref = tq.paged_attention(*args, scale=0.125)
    np.testing.assert_array_equal(tq.paged_attention(*args, scale=0.125, num_decodes=np.int64(2)), ref)


def test_block_table_padding_convention() -> None:
    """Entries past a request's ``ceil(seq_lens / block_size)`` blocks are never read, whatever they
    hold (vLLM pads with 0, other engines with -1); a used entry outside the cache is refused."""
    cache = _cache()
    rng = np.random.default_rng(2)
    ctx = rng.standard_normal((20, H, 64)).astype(np.float32)
    cache = tq.paged_write(cache, ctx, ctx, np.r_[np.arange(16) + 2 * BS, np.arange(4) + BS])  # blocks 2, 1
    q, new = rng.standard_normal((1, 2 * H, 64)).astype(np.float32), ctx[:1]
    seq, qsl = np.array([21], np.int32), np.array([0, 1], np.int32)
    ref = tq.paged_attention(cache, q, new, new, np.array([[2, 1]], np.int32), seq, qsl, scale=0.125)
    for pad in (0, -1, 2**31 - 1, -(2**31)):
        table = np.array([[2, 1, pad, pad]], np.int32)
        out = tq.paged_attention(cache, q, new, new, table, seq, qsl, scale=0.125)
        np.testing.assert_array_equal(out, ref)
    for bad in (-1, NB, -3):
        with pytest.raises(ValueError, match=rf"block_table\[0, 1\] = {bad} lies outside"):
            tq.paged_attention(cache, q, new, new, np.array([[2, bad]], np.int32), seq, qsl, scale=0.125)


def test_decode_requests_need_their_query_rows() -> None:
    """Decode request r reads query row r: more decode requests than rows is refused (on the GPU
    too, by shape), not read past the query."""
    cache = _cache()
    key = np.random.default_rng(3).standard_normal((1, H, 64)).astype(np.float32)
    cache = tq.paged_write(cache, key, key, np.array([0]))
    args = (cache, np.ones((1, 2 * H, 64), np.float32), key, key, np.array([[0], [1]], np.int32),
            np.array([1, 0], np.int32), np.array([0, 1, 1], np.int32))
    with pytest.raises(ValueError, match="num_decodes=2 but only 1 query rows"):
        tq.paged_attention(*args, scale=0.125, num_decodes=2)
    assert np.isfinite(tq.paged_attention(*args, scale=0.125, num_decodes=1)).all()
