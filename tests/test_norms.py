"""Record norms: bfloat16 rounded once from the float64 norm, and version 2 streams (float16 norms).

``data/v2_streams.npz`` was written by the library at commit 2de0145 (byte format version 2):
``x`` (2, 3, 64) float32 (``testing.kv_like``, seed 20261206, the second stream times 300), and per
configuration ("mse3.5": bits 3.5; "prod4": bits 4, mode prod, seed 7) the stream of
``encode(x, backend="numpy").to_bytes()`` and that version's ``decode`` of it.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import serialization
from turboquant_codec.backends import numpy_ref

V2 = Path(__file__).with_name("data") / "v2_streams.npz"


def _bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def test_norm_rounds_once_from_float64() -> None:
    """A norm just above a bfloat16 tie rounds up; through float32 it would land on the tie and round
    to even (down)."""
    x = np.zeros((1, 1, 16), np.float32)
    x[0, 0, :2] = 1 + 2.0**-8, 2.0**-14
    norm = np.linalg.norm(x.astype(np.float64))
    assert np.float32(norm) == 1 + 2.0**-8 < norm  # float32 holds the tie exactly
    enc = tq.encode(x, bits=4, backend="numpy")
    assert numpy_ref._norms(enc.records, enc.config.groups[0], 0)[0, 0] == 1 + 2.0**-7


def test_norm_bytes_rounds_every_tie_neighbourhood_once() -> None:
    """At every positive finite bfloat16 midpoint and its float64 neighbours: below rounds down, above
    up, the tie to the even word (whatever ml_dtypes version is installed: some round float64 through
    float32, which sends the neighbours to the tie)."""
    lo = np.arange(1, 0x7F7F, dtype=np.uint32)  # bfloat16 words with a finite successor
    mid = (_bf16(lo) + _bf16(lo + 1)) / 2
    near = (("below", np.nextafter(mid, 0)), ("tie", mid), ("above", np.nextafter(mid, np.inf)))
    words = {t: serialization.norm_bytes(v).view("<u2") for t, v in near}
    np.testing.assert_array_equal(words["below"], lo)
    np.testing.assert_array_equal(words["above"], lo + 1)
    np.testing.assert_array_equal(words["tie"], np.where(lo % 2 == 0, lo, lo + 1))


@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_stored_norm_is_the_nearest_bfloat16(mode: str) -> None:
    """Every stored norm is at least as close to the float64 norm as its two bfloat16 neighbours,
    over magnitudes from 1e-30 to 1e30."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 500, 32)) * 10.0 ** rng.uniform(-30, 30, (1, 500, 1))
    x = x.astype(np.float32)
    enc = tq.encode(x, bits=4, mode=mode, backend="numpy")
    g = enc.config.groups[0]
    norm = np.linalg.norm(x.astype(np.float64), axis=-1)
    words = enc.records[..., :2].copy().view("<u2")[..., 0]
    stored = _bf16(words)
    neighbours = np.stack([_bf16(words - 1), _bf16(words + 1)])
    assert np.all(np.abs(stored - norm) <= np.abs(neighbours - norm).min(0))
    np.testing.assert_array_equal(stored, numpy_ref._norms(enc.records, g, 0))
    assert np.all(np.abs(stored / norm - 1) <= 2.0**-8)


@pytest.mark.parametrize("name", ["mse3.5", "prod4"])
def test_version2_stream_written_by_the_old_library_decodes(name: str) -> None:
    """Its codes and signs load unchanged, its float16 norms as their nearest bfloat16; each decoded
    vector lies within 2**-7 (two norms at 2**-8 each) of what version 2 decoded, and as close to
    the input as that was."""
    data = np.load(V2)
    stream, old, x = data[f"stream_{name}"].tobytes(), data[f"decoded_{name}"], data["x"]
    assert int.from_bytes(stream[4:6], "little") == 2
    enc = tq.Encoded.from_bytes(stream)
    cfg = enc.config
    span = 2 * len(cfg.groups) * cfg.norms_per_group
    _, v2_records, _ = serialization.loads(_with_version(stream, 3))  # the bytes as stored
    np.testing.assert_array_equal(enc.records[..., span:], v2_records[..., span:])
    halves = v2_records[..., :span].copy().view("<f2").astype(np.float64)
    want = halves.astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(_bf16(enc.records[..., :span].copy().view("<u2")), want)
    new = tq.decode(enc).astype(np.float64)
    assert np.all(np.linalg.norm(new - old, axis=-1) <= 2.0**-7 * np.linalg.norm(old, axis=-1))
    err_new = np.sum((new - x) ** 2, -1) / np.sum(x.astype(np.float64) ** 2, -1)
    err_old = np.sum((old - x) ** 2, -1) / np.sum(x.astype(np.float64) ** 2, -1)
    assert abs(err_new.mean() / err_old.mean() - 1) < 0.01
    again = tq.Encoded.from_bytes(enc.to_bytes())  # written back as the current version
    assert int.from_bytes(enc.to_bytes()[4:6], "little") == serialization.FORMAT_VERSION == 4
    np.testing.assert_array_equal(again.records, enc.records)


def _with_version(stream: bytes, version: int) -> bytes:
    """``stream`` relabelled as ``version``, its CRC recomputed."""
    body = stream[:4] + version.to_bytes(2, "little") + stream[6:-4]
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_version1_is_still_refused() -> None:
    """Version 1 (exact Lloyd-Max centroids) stays unreadable: only the norms changed since 2."""
    blob = tq.encode(np.ones((1, 2, 16), np.float32), bits=4).to_bytes()
    body = _with_version(blob, 1)
    with pytest.raises(ValueError, match="format version 1; this library reads versions 2, 3, 4"):
        tq.Encoded.from_bytes(body)
