"""Properties of the public API over random inputs (hypothesis): shapes, dtypes, memory layouts,
bits, modes and seeds, byte streams with random corruption, scalars of every kind, and paged steps
with random (often hostile) metadata. Each property holds for every example, not on average:

- a strided view encodes to the records of its contiguous copy; a stream parses back to the same
  records and serialises to the same bytes; decode is finite; ``scores`` are the inner products
  with the decoded keys; ``attention`` is the softmax over the decoded keys and values;
- a corrupted stream is a ValueError; a re-sealed one (valid CRC) is a ValueError or parses to
  records that serialise back to exactly that stream and decode to finite values;
- a scalar argument is accepted as the integer it stands for, or refused with TypeError/ValueError;
- a paged step either is refused naming its argument or gives each request the output it gets alone.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import turboquant_codec as tq
from turboquant_codec import CodecConfig, PagedCache
from turboquant_codec.config import MSE_BITS, PROD_BITS

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONFIGS = [(b, "mse") for b in MSE_BITS] + [(b, "prod") for b in PROD_BITS]
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
LAYOUTS = ("contiguous", "strided", "transposed", "reversed")


def _laid_out(x: np.ndarray, layout: str) -> np.ndarray:
    """``x``'s values in another memory layout (a view, not contiguous except "contiguous")."""
    if layout == "strided":  # every other element of a wider array
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed":  # channels outermost in memory
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if layout == "reversed":  # negative strides over the vectors
        return np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    return x


@st.composite
def vectors(draw: Any, min_lead: int = 0) -> tuple[np.ndarray, float, str, int]:
    """(x of shape (*lead, n, d) in a random dtype and layout, bits, mode, seed)."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=min_lead, max_size=2)))
    n, d = draw(st.integers(1, 6)), draw(st.sampled_from([16, 32, 48, 64]))
    bits, mode = draw(st.sampled_from(CONFIGS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    scale = draw(st.sampled_from([0.01, 1.0, 100.0]))
    x = (rng.standard_normal(lead + (n, d)) * scale).astype(DTYPES[draw(st.sampled_from(sorted(DTYPES)))])
    return _laid_out(x, draw(st.sampled_from(LAYOUTS))), bits, mode, draw(st.integers(0, 2**64 - 1))


@SETTINGS
@given(vectors())
def test_encode_decode_bytes_scores(case: tuple[np.ndarray, float, str, int]) -> None:
    x, bits, mode, seed = case
    enc = tq.encode(x, bits=bits, mode=mode, seed=seed)
    same = tq.encode(np.ascontiguousarray(x), bits=bits, mode=mode, seed=seed)
    assert np.array_equal(enc.records, same.records)
    assert (enc.channels is None) == (same.channels is None)
    if enc.channels is not None:
        assert np.array_equal(enc.channels, same.channels)
    blob = enc.to_bytes()
    back = tq.Encoded.from_bytes(blob)
    assert back.config == enc.config and np.array_equal(back.records, enc.records) and back.to_bytes() == blob
    dec = tq.decode(enc)
    assert dec.dtype == np.float32 and dec.shape == x.shape and np.isfinite(dec).all()
    assert np.array_equal(tq.decode(back), dec)
    rng = np.random.default_rng(seed % 2**32)
    q = rng.standard_normal(x.shape[:-2] + (3, x.shape[-1])).astype(np.float32)
    s = tq.scores(q, enc)
    ref = q @ np.swapaxes(dec.astype(np.float64), -1, -2)
    bound = np.linalg.norm(q, axis=-1)[..., None] * np.linalg.norm(dec, axis=-1)[..., None, :]
    assert np.all(np.abs(s - ref) <= 1e-5 * bound + 1e-30)


@SETTINGS
@given(vectors(min_lead=1), st.integers(1, 3), st.integers(0, 3), st.sampled_from([0.05, 0.125, 1.0]))
def test_attention_is_softmax_over_decoded(case: tuple[np.ndarray, float, str, int], group: int, t: int,
                                           scale: float) -> None:
    x, bits, mode, seed = case  # (..., h_kv, n, d): the last lead axis is the KV heads
    rng = np.random.default_rng(seed % 2**32)
    k_enc = tq.encode(x, bits=bits, mode=mode, seed=seed)
    v_enc = tq.encode(x[..., ::-1, :], bits=bits, mode=mode, seed=seed ^ 1)
    h_kv, d = x.shape[-3], x.shape[-1]
    q = rng.standard_normal(x.shape[:-3] + (h_kv * group, d)).astype(np.float32)
    tails = {}
    if t:
        tails = {name: rng.standard_normal(x.shape[:-2] + (t, d)).astype(np.float32)
                 for name in ("k_tail", "v_tail")}
    out = tq.attention(q, k_enc, v_enc, scale=scale, **tails)
    keys, values = tq.decode(k_enc).astype(np.float64), tq.decode(v_enc).astype(np.float64)
    if t:
        keys = np.concatenate([keys, tails["k_tail"]], axis=-2)
        values = np.concatenate([values, tails["v_tail"]], axis=-2)
    # Query head i reads KV head i // group.
    keys, values = np.repeat(keys, group, axis=-3), np.repeat(values, group, axis=-3)
    logits = scale * np.einsum("...hd,...hnd->...hn", q.astype(np.float64), keys)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    ref = np.einsum("...hn,...hnd->...hd", w / w.sum(axis=-1, keepdims=True), values)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ------------------------------------------------------------------------------------ corruption
@st.composite
def streams(draw: Any) -> tuple[bytes, int, int]:
    """(stream, offset of its first record, record bytes)."""
    x, bits, mode, seed = draw(vectors())
    enc = tq.encode(x[..., :2, :], bits=bits, mode=mode, seed=seed)
    blob = enc.to_bytes()
    return blob, len(blob) - 4 - enc.records.size, enc.config.record_bytes


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@SETTINGS
@given(streams(), st.data())
def test_corrupted_streams_are_value_errors(stream: tuple[bytes, int, int], data: st.DataObject) -> None:
    blob = stream[0]
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(blob) - 1))
        bad = blob[:at] + bytes([blob[at] ^ data.draw(st.integers(1, 255))]) + blob[at + 1 :]
    elif kind == "truncate":
        bad = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "extend":
        bad = blob + data.draw(st.binary(min_size=1, max_size=16))
    else:  # a run of bytes replaced by others of the same length
        at = data.draw(st.integers(0, len(blob) - 1))
        run = data.draw(st.binary(min_size=1, max_size=4))
        bad = blob[:at] + run + blob[at + len(run) :]
        if bad[: len(blob)] == blob[: len(bad)] and len(bad) == len(blob):
            return  # the run matched what was there: not a corruption
    with pytest.raises(ValueError):
        tq.Encoded.from_bytes(bad)


@SETTINGS
@given(streams(), st.data())
def test_resealed_streams_parse_exactly_or_are_refused(stream: tuple[bytes, int, int],
                                                       data: st.DataObject) -> None:
    """A crafted body with a valid CRC: refused with a ValueError, or every byte of it is a field
    the parse keeps (serialising again gives the stream back) and it decodes to finite values.
    Bytes are changed anywhere, in the header, or where a record's first norm (its high byte:
    sign and exponent) or its last byte (padding, where the record has some) sits."""
    blob, rec0, size = stream
    body = bytearray(blob[:-4])
    n_records = (len(body) - rec0) // size
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.sampled_from(["anywhere", "header", "norm", "last"]))
        record = rec0 + size * data.draw(st.integers(0, n_records - 1))
        at = {"anywhere": data.draw(st.integers(0, len(body) - 1)),
              "header": data.draw(st.integers(4, rec0 - 1)),
              "norm": record + 1, "last": record + size - 1}[where]
        # A norm's high byte: also the float16 classes an encoder never writes (inf, NaN, negative).
        special = st.sampled_from([0x7C, 0x7E, 0xFC, 0xFF, 0x80, 0xBC])
        values = st.one_of(special, st.integers(0, 255)) if where == "norm" else st.integers(0, 255)
        body[at] = data.draw(values)
    if data.draw(st.booleans()):
        del body[data.draw(st.integers(0, len(body) - 1)) :]
    crafted = _seal(bytes(body))
    try:
        enc = tq.Encoded.from_bytes(crafted)
    except ValueError:
        return
    assert enc.to_bytes() == crafted
    assert np.isfinite(tq.decode(enc)).all()


# --------------------------------------------------------------------------------------- scalars
SCALARS = st.one_of(st.integers(-(2**65), 2**65), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.none(), st.text(max_size=3),
                    st.integers(-(2**63), 2**63 - 1).map(np.int64),
                    st.integers(0, 2**64 - 1).map(np.uint64), st.floats(width=32).map(np.float32))


@SETTINGS
@given(SCALARS)
def test_seed_of_any_kind(seed: object) -> None:
    integral = isinstance(seed, int | np.integer) and not isinstance(seed, bool)
    ok = integral and 0 <= int(seed) < 2**64  # type: ignore[arg-type]
    for make in (lambda: CodecConfig(16, 2, seed=seed).seed, lambda: tq.stream_seed(seed, 1)):
        if ok:
            value = make()
            assert type(value) is int
        else:
            with pytest.raises(TypeError if not integral else ValueError, match="seed must be an integer"):
                make()
    if ok:
        assert CodecConfig(16, 2, seed=seed) == CodecConfig(16, 2, seed=int(seed))  # type: ignore[arg-type]


@SETTINGS
@given(SCALARS, SCALARS)
def test_config_bits_and_d_of_any_kind(bits: object, d: object) -> None:
    try:
        cfg = CodecConfig(d, bits)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        assert "bits" in str(e) or "d" in str(e)
        return
    assert isinstance(d, int | np.integer) and not isinstance(d, bool) and cfg.d == int(d)
    assert isinstance(bits, int | float | np.number) and not isinstance(bits, bool)
    assert cfg.bits == float(bits)


@SETTINGS
@given(SCALARS)
@example(1.1836387992115405e307)  # scaled before the maximum was out: inf - inf in the reference
@example(float(np.finfo(np.float64).max))
def test_scale_of_any_kind(scale: object) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    enc = tq.encode(x, bits=2)
    real = isinstance(scale, int | float | np.number) and not isinstance(scale, bool)
    if real and np.isfinite(float(scale)) and float(scale) > 0:  # type: ignore[arg-type]
        assert np.isfinite(tq.attention(x[:, 0], enc, enc, scale=scale)).all()
    else:
        with pytest.raises(TypeError if not real else ValueError, match="scale must be a"):
            tq.attention(x[:, 0], enc, enc, scale=scale)


# ------------------------------------------------------------------------------------ paged steps
H, BS, NB = 2, 16, 6


@pytest.fixture(scope="module")
def paged_cache() -> PagedCache:
    """Every block of the cache written with random tokens (3 bits: no channel split)."""
    rng = np.random.default_rng(1)
    k, v = CodecConfig(32, 3, seed=1), CodecConfig(32, 3, seed=2)
    cache = PagedCache(np.zeros((NB, BS, H, k.record_bytes), np.uint8),
                       np.zeros((NB, BS, H, v.record_bytes), np.uint8), k, v)
    kv = rng.standard_normal((2, NB * BS, H, 32)).astype(np.float32)
    return tq.paged_write(cache, kv[0], kv[1], np.arange(NB * BS))


@SETTINGS
@given(st.data())
def test_paged_step_is_refused_or_per_request(paged_cache: PagedCache, data: st.DataObject) -> None:
    b = data.draw(st.integers(1, 3))
    q_lens = data.draw(st.lists(st.integers(0, 3), min_size=b, max_size=b))
    starts = np.concatenate([[0], np.cumsum(q_lens)])
    if data.draw(st.booleans()):  # sometimes a hostile query_start_loc
        starts[data.draw(st.integers(0, b))] += data.draw(st.integers(-3, 3))
    seq = np.array(data.draw(st.lists(st.integers(-2, 3 * BS + 8), min_size=b, max_size=b)), np.int32)
    table = np.array(data.draw(st.lists(st.lists(st.integers(-2, NB + 1), min_size=3, max_size=3), min_size=b,
                                        max_size=b)), np.int32)
    t = max(int(starts[-1]), 1) + data.draw(st.integers(0, 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    query = rng.standard_normal((t, 2 * H, 32)).astype(np.float32)
    key = rng.standard_normal((t, H, 32)).astype(np.float32)
    args = (query, key, key, table, seq, starts.astype(np.int32))
    try:
        out = tq.paged_attention(paged_cache, *args, scale=0.2)
    except ValueError as e:
        assert any(name in str(e) for name in ("block_table", "seq_lens", "query_start_loc"))
        return
    assert np.isfinite(out).all()
    for r in range(b):  # each request alone, its rows moved to the front
        q0, q1 = int(starts[r]), int(starts[r + 1])
        rows = slice(q0, q1)
        if q1 > q0:
            alone = tq.paged_attention(paged_cache, query[rows], key[rows], key[rows], table[r : r + 1],
                                       seq[r : r + 1], np.array([0, q1 - q0], np.int32), scale=0.2)
            np.testing.assert_array_equal(out[rows], alone)
