"""The byte record and stream format, the registry and the honest size accounting."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import turboquant_codec as tq
from turboquant_codec.backends import numpy_ref
from turboquant_codec.config import MSE_BITS, PROD_BITS, ROTATIONS, CodecConfig


@pytest.mark.parametrize(
    ("d", "bits", "mode", "record_bytes"),
    [
        (128, 3.5, "mse", 4 + 32 + 24),  # 2 norms, 64x4 + 64x3 code bits
        (128, 3.0, "mse", 2 + 48 + 2),  # padded to a multiple of 4
        (128, 3.5, "prod", 8 + 24 + 16 + 8 + 8),  # 4 norms, codes 3+2 bits, 2x64 sign bits
        (64, 2.5, "mse", 4 + 12 + 8),
        (64, 1.0, "mse", 2 + 8 + 2),  # padded to a multiple of 4
    ],
)
def test_record_sizes(d: int, bits: float, mode: str, record_bytes: int) -> None:
    assert CodecConfig(d, bits, mode).record_bytes == record_bytes


def test_bits_per_value_is_honest_and_small_at_d128() -> None:
    x = np.random.default_rng(0).standard_normal((8, 4096, 128)).astype(np.float16)
    enc = tq.encode(x, bits=3.5)
    assert enc.nbytes == enc.records.nbytes + enc.channels.nbytes
    assert enc.bits_per_value == pytest.approx(8 * enc.nbytes / x.size)
    # Norms and channel lists cost about a quarter bit here: within the half-bit budget.
    assert 3.5 < enc.bits_per_value < 4.0
    assert enc.nbytes * 4.2 < x.nbytes


def test_record_fields_hold_what_the_layout_says() -> None:
    """Decode one record by hand from the documented layout and compare with the API."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 1, 64)).astype(np.float32)
    enc = tq.encode(x, bits=2.5, seed=3)
    rec = enc.records[0, 0]
    cfg = enc.config
    hi, lo = cfg.groups
    norms = (rec[:4].view("<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64)  # bfloat16
    perm = enc.channels[0].astype(int)
    np.testing.assert_allclose(norms, [np.linalg.norm(x[0, 0, perm[:32]]),
                                       np.linalg.norm(x[0, 0, perm[32:]])], rtol=2**-8)
    bits = np.unpackbits(rec[hi.code_offset:hi.code_offset + 12], bitorder="little")
    codes = (bits.reshape(32, 3) << np.arange(3)).sum(1)
    from turboquant_codec.transforms import tables

    t = tables(cfg)[0]
    want = np.searchsorted(t.boundaries, t.rotation @ x[0, 0, perm[:32]] / norms[0])
    assert np.mean(codes == want) > 0.95


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 9),
    d=st.sampled_from([16, 32, 64]),
    mode_bits=st.one_of(
        st.tuples(st.just("mse"), st.sampled_from(MSE_BITS)),
        st.tuples(st.just("prod"), st.sampled_from(PROD_BITS)),
    ),
    seed=st.integers(0, 2**64 - 1),
    rotation=st.sampled_from(ROTATIONS),
)
def test_bytes_round_trip(lead, n, d, mode_bits, seed, rotation) -> None:
    mode, bits = mode_bits
    x = np.random.default_rng(n).standard_normal((*lead, n, d)).astype(np.float32)
    enc = tq.encode(x, bits=bits, mode=mode, seed=seed, rotation=rotation)
    back = tq.Encoded.from_bytes(enc.to_bytes())
    assert back.config == enc.config and back.shape == x.shape
    np.testing.assert_array_equal(back.records, enc.records)
    np.testing.assert_array_equal(tq.decode(back), tq.decode(enc))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_bits_round_trip(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 1 << bits, (3, 5, 64))
    packed = numpy_ref.pack_bits(values, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    np.testing.assert_array_equal(numpy_ref.unpack_bits(packed, bits, 64), values)


def test_same_seed_same_transform_different_seed_different() -> None:
    x = np.random.default_rng(0).standard_normal((1, 6, 64)).astype(np.float32)
    a, b, c = (tq.encode(x, bits=3, seed=s).records for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5
    assert tq.stream_seed(0, 1) != tq.stream_seed(0, 2) != tq.stream_seed(1, 1)


def test_import_does_not_import_gpu_libraries() -> None:
    code = "import sys, turboquant_codec; print(sorted(m for m in ('numba', 'cupy') if m in sys.modules))"
    env = {k: v for k, v in os.environ.items() if k != "TQ_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_backends_table_gives_reasons() -> None:
    rows = tq.backends()
    names = [r.name for r in rows]
    assert names[0] == "numpy" and rows[0].available
    for row in rows:
        assert row.available or row.reason, f"{row.name} is unavailable without a reason"


def _version3(blob: bytes) -> bytes:
    """The same stream as format version 3 wrote it (bfloat16 norms): no rotation byte at offset 18."""
    body = bytearray(blob[:-4])
    body[4:6] = struct.pack("<H", 3)
    del body[18]
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_streams_before_version4_load_as_haar() -> None:
    x = np.random.default_rng(4).standard_normal((2, 7, 64)).astype(np.float32)
    enc = tq.encode(x, bits=3.5, seed=9)
    old = tq.Encoded.from_bytes(_version3(enc.to_bytes()))
    assert old.config == enc.config and old.config.rotation == "haar"
    np.testing.assert_array_equal(tq.decode(old), tq.decode(enc))
    # An older reader had only Haar rotations: a stream of another kind cannot pass as one.
    other = tq.encode(x, bits=3.5, seed=9, rotation="hadamard2")
    assert tq.Encoded.from_bytes(_version3(other.to_bytes())).config.rotation == "haar"


def test_unknown_rotation_byte_is_refused() -> None:
    body = bytearray(tq.encode(np.ones((3, 64), np.float32)).to_bytes()[:-4])
    body[18] = len(ROTATIONS)
    with pytest.raises(ValueError, match="unknown rotation kind 3"):
        tq.Encoded.from_bytes(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))


@pytest.mark.parametrize("dim", [8, 32, 64])
def test_rotation_kinds(dim: int) -> None:
    """Every kind is orthogonal; the fixed Hadamard ignores the seed, the others follow it."""
    from turboquant_codec.transforms import rotation_matrix, sylvester_hadamard

    for kind in ROTATIONS:
        r = rotation_matrix(kind, 3, 0, dim)
        np.testing.assert_allclose(r @ r.T, np.eye(dim), atol=1e-12)
        same = np.array_equal(r, rotation_matrix(kind, 4, 0, dim))
        assert same == (kind == "hadamard"), kind
    np.testing.assert_array_equal(rotation_matrix("hadamard", 0, 0, dim), sylvester_hadamard(dim))
    # Two randomized rounds mix every input coordinate into every output at equal magnitude.
    h2 = rotation_matrix("hadamard2", 5, 1, dim)
    assert not np.allclose(np.abs(h2), 1 / np.sqrt(dim))  # two rounds are not a signed Hadamard
    assert np.allclose((h2**2).sum(0), 1.0)


@pytest.mark.parametrize(("d", "bits"), [(96, 3.0), (48, 3.5), (80, 4.0)])
def test_hadamard_kinds_refuse_non_power_of_two_groups(d: int, bits: float) -> None:
    CodecConfig(d, bits, rotation="haar")  # Haar serves any group size
    for kind in ("hadamard", "hadamard2"):
        with pytest.raises(ValueError, match="needs power-of-two channel groups"):
            CodecConfig(d, bits, rotation=kind)
    with pytest.raises(ValueError, match="rotation must be one of"):
        CodecConfig(64, bits, rotation="dct")
