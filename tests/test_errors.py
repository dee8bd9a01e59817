"""Bad input gets a clear error naming what was wrong; nothing crashes or returns garbage."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import serialization


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 10, 64)).astype(np.float32)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_input_names_count_and_place(x: np.ndarray, value: float) -> None:
    x[1, 3, 7] = value
    x[1, 4, 0] = value
    with pytest.raises(ValueError, match=r"2 NaN/Inf values; the first at index \(1, 3, 7\)"):
        tq.encode(x)


def test_non_finite_query(x: np.ndarray) -> None:
    enc = tq.encode(x)
    q = x[:, :2].copy()
    q[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="q holds 1 NaN/Inf"):
        tq.scores(q, enc)


def test_attention_checks_the_query_unless_told_not_to(x: np.ndarray) -> None:
    enc = tq.encode(x)  # 2 KV heads of 10 tokens
    q = x[:, 0].copy()  # one query head per KV head
    q[0, 5] = np.inf
    with pytest.raises(ValueError, match="q holds 1 NaN/Inf"):
        tq.attention(q, enc, enc, scale=0.125)
    out = tq.attention(q, enc, enc, scale=0.125, check_finite=False)
    # The unchecked query reaches the softmax: its row is non-finite, the clean row is untouched.
    assert not np.isfinite(out[0]).all()
    np.testing.assert_allclose(out[1], tq.attention(q[1:], *(tq.encode(x[1:]),) * 2, scale=0.125)[0])


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((64,), np.float32, "at least 2 dimensions"),
        ((2, 0, 64), np.float32, "empty"),
        ((2, 5, 0), np.float32, "empty"),
        ((2, 5, 64), np.int32, "dtype int32"),
        ((2, 5, 64), np.float64, "dtype float64"),
        ((2, 5, 40), np.float32, "multiple of 16"),
    ],
    ids=["rank1", "no-vectors", "no-channels", "int32", "float64", "d40"],
)
def test_encode_rejects_bad_arrays(shape, dtype, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tq.encode(np.ones(shape, dtype=dtype))


def test_encode_rejects_non_arrays() -> None:
    with pytest.raises(TypeError, match="array or tensor"):
        tq.encode([[1.0] * 64])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 0.5}, "bits=0.5 is not supported"),
        ({"bits": 5}, "bits=5 is not supported for mode 'mse'"),
        ({"bits": 1, "mode": "prod"}, "bits=1 is not supported for mode 'prod'"),
        ({"bits": 3.25}, "bits=3.25"),
        ({"mode": "qjl"}, "mode must be one of"),
        ({"seed": -1}, "seed must be an integer"),
        ({"seed": 2**64}, "seed must be an integer"),
    ],
    ids=["bits-low", "bits-high", "prod-1bit", "quarter-bits", "mode", "seed-neg", "seed-big"],
)
def test_encode_rejects_bad_config(x: np.ndarray, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tq.encode(x, **kwargs)


def test_norm_beyond_bfloat16_range() -> None:
    x = np.full((1, 2, 64), 5e37, np.float32)  # norm 4e38: bfloat16 infinity
    with pytest.raises(ValueError, match="2 channel-group norms .* bfloat16 norm range"):
        tq.encode(x, bits=4)
    tq.encode(x / 2, bits=4)  # norm 2e38: stored


def test_channels_misuse(x: np.ndarray) -> None:
    enc = tq.encode(x, bits=3.5)
    with pytest.raises(ValueError, match="no channel split"):
        tq.encode(x, bits=3, channels=enc.channels)
    with pytest.raises(ValueError, match=r"channels must have shape \(2, 64\)"):
        tq.encode(x, bits=3.5, channels=enc.channels[:1])


def test_scores_shape_mismatches(x: np.ndarray) -> None:
    enc = tq.encode(x)
    with pytest.raises(ValueError, match="q has last dimension 32 but keys has 64"):
        tq.scores(np.ones((2, 3, 32), np.float32), enc)
    with pytest.raises(ValueError, match="leading dimensions differ"):
        tq.scores(np.ones((3, 3, 64), np.float32), enc)
    with pytest.raises(TypeError, match="Encoded keys"):
        tq.scores(np.ones((2, 3, 64), np.float32), x)


def test_attention_shape_mismatches() -> None:
    rng = np.random.default_rng(1)
    kv = rng.standard_normal((2, 12, 64)).astype(np.float32)
    k, v = tq.encode(kv), tq.encode(kv, seed=1)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        tq.attention(np.ones((3, 64), np.float32), k, v, scale=0.1)
    with pytest.raises(ValueError, match="given together"):
        tq.attention(np.ones((4, 64), np.float32), k, v, scale=0.1, k_tail=kv[:, :2])
    with pytest.raises(ValueError, match="q has last dimension 64 but v_tail has 32"):
        tq.attention(np.ones((4, 64), np.float32), k, v, scale=0.1, k_tail=kv[:, :2],
                     v_tail=np.ones((2, 2, 32), np.float32))
    with pytest.raises(ValueError, match="k_enc has shape"):
        tq.attention(np.ones((4, 64), np.float32), k, tq.encode(kv[:, :5]), scale=0.1)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        tq.attention(np.ones((4, 64), np.float32), k, v, scale=0.0)


def test_unknown_backend_lists_valid_ones(x: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; valid backends: auto, numpy"):
        tq.encode(x, backend="tpu")


def test_env_override_is_validated(x: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQ_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        tq.encode(x)
    monkeypatch.setenv("TQ_BACKEND", "numpy")
    assert tq.encode(x).records.shape[:-1] == (2, 10)


# ----------------------------------------------------------------------------------- from_bytes
@pytest.fixture
def blob(x: np.ndarray) -> bytes:
    return tq.encode(x, bits=3.5, mode="prod").to_bytes()


def _resign(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_truncated_bytes(blob: bytes) -> None:
    for cut in (3, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ValueError, match="truncated|corrupted|CRC"):
            tq.Encoded.from_bytes(blob[:cut])


def test_corrupted_bytes(blob: bytes) -> None:
    bad = bytearray(blob)
    bad[len(blob) // 2] ^= 0x10
    with pytest.raises(ValueError, match="CRC-32 mismatch"):
        tq.Encoded.from_bytes(bytes(bad))


def test_future_version_and_bad_magic(blob: bytes) -> None:
    body = bytearray(blob[:-4])
    body[4:6] = struct.pack("<H", serialization.FORMAT_VERSION + 1)
    future = serialization.FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"format version {future}; this library reads versions 2, 3, 4"):
        tq.Encoded.from_bytes(_resign(bytes(body)))
    with pytest.raises(ValueError, match="not a TurboQuant stream"):
        tq.Encoded.from_bytes(_resign(b"NOPE" + bytes(body[4:])))


def test_consistent_crc_but_wrong_length(blob: bytes) -> None:
    with pytest.raises(ValueError, match="header describes"):
        tq.Encoded.from_bytes(_resign(blob[:-4] + b"\x00" * 4))


def test_channels_not_a_permutation(x: np.ndarray) -> None:
    enc = tq.encode(x, bits=2.5)
    channels = enc.channels.copy()
    channels[0, 0] = channels[0, 1]
    forged = serialization.dumps(enc.config, enc.records, channels)
    with pytest.raises(ValueError, match="a permutation of 0..63 in every row"):
        tq.Encoded.from_bytes(forged)
    with pytest.raises(ValueError, match="a permutation of 0..63 in every row"):
        tq.encode(x, bits=2.5, channels=channels)


def test_encoded_validates_its_arrays(x: np.ndarray) -> None:
    enc = tq.encode(x, bits=3.5)
    with pytest.raises(ValueError, match="records must have shape"):
        tq.Encoded(records=enc.records[..., :-1], channels=enc.channels, config=enc.config)
    with pytest.raises(ValueError, match="channel permutation is required"):
        tq.Encoded(records=enc.records, channels=None, config=enc.config)
    with pytest.raises(ValueError, match="records must be uint8"):
        tq.Encoded(records=enc.records.view(np.int8), channels=enc.channels, config=enc.config)
