"""The byte record and stream format, the registry and the honest size accounting."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import turboquant_codec as tq
from turboquant_codec.backends import numpy_ref
from turboquant_codec.config import MSE_BITS, PROD_BITS, CodecConfig


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
)
def test_bytes_round_trip(lead, n, d, mode_bits, seed) -> None:
    mode, bits = mode_bits
    x = np.random.default_rng(n).standard_normal((*lead, n, d)).astype(np.float32)
    enc = tq.encode(x, bits=bits, mode=mode, seed=seed)
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
