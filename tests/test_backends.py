"""Every backend against the NumPy reference, on fresh random data, over the capability table.

Byte records are compared field by field: codes and QJL signs may differ only where float32
rounding puts a value on a codebook boundary (we allow 1 in 1000 coordinates), norms are bfloat16 on
both sides (one step apart at most: float32 and float64 norms may round to neighbours). Values decoded
from the same records are compared within float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec.backends import numpy_ref
from turboquant_codec.capabilities import CAPABILITIES
from turboquant_codec.config import ROTATIONS, CodecConfig
from turboquant_codec.testing import NORM_RTOL

from .conftest import BackendUnderTest, kv_like

# Boundary ties are the only allowed disagreement between float32 and float64 encoders.
MAX_CODE_MISMATCH = 1e-3
# float32 accumulation over d <= 128 terms of magnitude <= |x|: a few ulps of the result's scale.
RTOL32 = 2e-5

CONFIGS = [(1, "mse"), (2.5, "mse"), (3, "mse"), (3.5, "mse"), (4, "mse"), (2, "prod"), (3.5, "prod")]
DIMS = (64, 128)


def _ids(cfg: tuple[float, str]) -> str:
    return f"{cfg[1]}{cfg[0]:g}"


def _supported(op: str, name: str, d: int, bits: float, mode: str, dtype: str = "float32") -> None:
    support = CAPABILITIES[op].get(name)
    if support is None:
        pytest.skip(f"{name} does not implement {op}")
    refusal = support.refusal(dtype, d, bits, mode)
    if refusal:
        pytest.skip(f"{name} does not declare {refusal}")


def _shape(backend: BackendUnderTest, n: int) -> tuple[int, int]:
    """(streams, vectors) small enough for the CUDA simulator's few blocks."""
    return (1, min(n, 3)) if backend.simulated else (3, n)


def _fields(records: np.ndarray, cfg: CodecConfig) -> dict[str, np.ndarray]:
    out = {}
    for g in cfg.groups:
        out[f"codes{g.index}"] = numpy_ref._codes(records, g)
        out[f"norm{g.index}"] = numpy_ref._norms(records, g, 0)
        if g.qjl:
            out[f"signs{g.index}"] = numpy_ref._signs(records, g)
            out[f"gamma{g.index}"] = numpy_ref._norms(records, g, 1)
    return out


@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_encode_matches_reference(backend: BackendUnderTest, cfg, d: int, dtype: str) -> None:
    bits, mode = cfg
    _supported("encode", backend.name, d, bits, mode, dtype)
    streams, n = _shape(backend, 37)
    x = kv_like(np.random.default_rng(7), (streams, n, d)).astype(dtype)
    ref = tq.encode(x, bits=bits, mode=mode, seed=11, backend="numpy")
    got = tq.encode(backend.put(x), bits=bits, mode=mode, seed=11, backend=backend.name)
    assert got.shape == ref.shape and got.bits_per_value == ref.bits_per_value
    if ref.channels is not None:
        np.testing.assert_array_equal(backend.get(got.channels), ref.channels)
    records = backend.get(got.records)
    assert records.dtype == np.uint8 and records.shape == ref.records.shape
    # Padding bytes are part of the format: zero on every backend.
    np.testing.assert_array_equal(records[..., ref.config.record_bytes - _padding(ref.config):], 0)
    ours, theirs = _fields(records, ref.config), _fields(ref.records, ref.config)
    for key in theirs:
        if key.startswith(("norm", "gamma")):
            np.testing.assert_allclose(ours[key], theirs[key], rtol=NORM_RTOL, err_msg=key)
        else:
            mismatch = np.mean(ours[key] != theirs[key])
            assert mismatch <= MAX_CODE_MISMATCH, f"{key}: {mismatch:.4%} of coordinates differ"


def _padding(cfg: CodecConfig) -> int:
    used = 2 * len(cfg.groups) * cfg.norms_per_group
    used += sum(g.code_bytes + g.sign_bytes for g in cfg.groups)
    return cfg.record_bytes - used


def _rel_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.mean(np.sum((x_hat - x64) ** 2, axis=-1) / np.sum(x64**2, axis=-1)))


@pytest.mark.parametrize("scale", [1e-20, 1e-9, 1e6, 1e30], ids=lambda s: f"x{s:g}")
@pytest.mark.parametrize("cfg", [(3.5, "mse"), (3, "prod")], ids=_ids)
def test_tiny_and_huge_vectors_keep_their_accuracy(backend: BackendUnderTest, cfg, scale: float) -> None:
    """Vectors far from unit size (float32 input) encode as the reference does and decode with the
    relative error of the same vectors at unit size: the norms' range is float32's."""
    bits, mode = cfg
    d = 64
    _supported("encode", backend.name, d, bits, mode)
    streams, n = _shape(backend, 37)
    unit = kv_like(np.random.default_rng(9), (streams, n, d))
    x = (unit * np.float32(scale)).astype(np.float32)
    ref = tq.encode(x, bits=bits, mode=mode, seed=3, backend="numpy")
    got = tq.encode(backend.put(x), bits=bits, mode=mode, seed=3, backend=backend.name)
    ours, theirs = _fields(backend.get(got.records), ref.config), _fields(ref.records, ref.config)
    for key in theirs:
        if key.startswith(("norm", "gamma")):
            assert np.all(theirs[key] > 0), key
            np.testing.assert_allclose(ours[key], theirs[key], rtol=NORM_RTOL, err_msg=key)
        else:
            assert np.mean(ours[key] != theirs[key]) <= MAX_CODE_MISMATCH, key
    at_unit = _rel_mse(unit, tq.decode(tq.encode(unit, bits=bits, mode=mode, seed=3, backend="numpy")))
    for decoded in (tq.decode(ref), backend.get(tq.decode(got, backend=backend.name))):
        assert abs(_rel_mse(x, decoded.astype(np.float64)) / at_unit - 1) < 0.02


@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_decode_and_scores_match_reference(backend: BackendUnderTest, cfg, d: int) -> None:
    bits, mode = cfg
    _supported("decode", backend.name, d, bits, mode)
    _supported("scores", backend.name, d, bits, mode)
    streams, n = _shape(backend, 53)
    rng = np.random.default_rng(3)
    ref = tq.encode(kv_like(rng, (streams, n, d)), bits=bits, mode=mode, seed=5, backend="numpy")
    enc = tq.Encoded(
        records=backend.put(ref.records),
        channels=None if ref.channels is None else backend.put(ref.channels),
        config=ref.config,
    )
    want = tq.decode(ref, backend="numpy")
    got = backend.get(tq.decode(enc, backend=backend.name))
    assert got.dtype == np.float32
    scale = np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=RTOL32 * scale.max())
    q = rng.standard_normal((streams, 5, d)).astype(np.float32)
    want_s = tq.scores(q, ref, backend="numpy")
    got_s = backend.get(tq.scores(backend.put(q), enc, backend=backend.name))
    bound = RTOL32 * np.linalg.norm(q, axis=-1)[..., None] * scale.max()
    assert np.all(np.abs(got_s - want_s) <= bound + RTOL32 * np.abs(want_s))


@pytest.mark.parametrize("groups", [1, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("tail", [0, 9], ids=lambda t: f"tail{t}")
@pytest.mark.parametrize("kv", [((3.5, "mse"), (3.5, "mse")), ((3, "prod"), (2.5, "mse"))],
                         ids=lambda kv: f"k{_ids(kv[0])}-v{_ids(kv[1])}")
def test_attention_matches_reference(backend: BackendUnderTest, groups: int, tail: int, kv) -> None:
    (kb, km), (vb, vm) = kv
    d = 64
    _supported("attention", backend.name, d, kb, km)
    _supported("attention", backend.name, d, vb, vm)
    h_kv = 1 if backend.simulated else 2
    n = 5 if backend.simulated else 300
    rng = np.random.default_rng(groups * 100 + tail)
    k = kv_like(rng, (2, h_kv, n, d))
    v = rng.standard_normal((2, h_kv, n, d)).astype(np.float32)
    q = (rng.standard_normal((2, h_kv * groups, d)) * 2).astype(np.float32)
    k_enc = tq.encode(k, bits=kb, mode=km, seed=1, backend="numpy")
    v_enc = tq.encode(v, bits=vb, mode=vm, seed=2, backend="numpy")
    tails = {}
    if tail:
        tails = {
            "k_tail": rng.standard_normal((2, h_kv, tail, d)).astype(np.float32),
            "v_tail": rng.standard_normal((2, h_kv, tail, d)).astype(np.float32),
        }
    scale = d**-0.5
    want = tq.attention(q, k_enc, v_enc, scale=scale, backend="numpy", **tails)
    on = {key: backend.put(val) for key, val in tails.items()}

    def put(e: tq.Encoded) -> tq.Encoded:
        ch = None if e.channels is None else backend.put(e.channels)
        return tq.Encoded(records=backend.put(e.records), channels=ch, config=e.config)

    got = backend.get(tq.attention(backend.put(q), put(k_enc), put(v_enc), scale=scale,
                                   backend=backend.name, **on))
    assert got.shape == want.shape == (2, h_kv * groups, d)
    # Outputs are convex combinations of values of norm ~sqrt(d): float32 error scales with that.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(d))


def test_attention_writes_out(backend: BackendUnderTest) -> None:
    """``out=``: the result lands in the given array, which is returned; a wrong shape or dtype is
    refused before anything runs."""
    d = 64
    _supported("attention", backend.name, d, 3.5, "mse")
    rng = np.random.default_rng()
    k_enc = tq.encode(kv_like(rng, (2, 9, d)), bits=3.5, seed=1, backend="numpy")
    v_enc = tq.encode(rng.standard_normal((2, 9, d)).astype(np.float32), bits=3.5, seed=2, backend="numpy")
    q = rng.standard_normal((4, d)).astype(np.float32)
    want = tq.attention(q, k_enc, v_enc, scale=0.125, backend="numpy")
    on = [tq.Encoded(backend.put(e.records), backend.put(e.channels), e.config) for e in (k_enc, v_enc)]
    out = backend.put(np.full((4, d), np.nan, np.float32))
    got = tq.attention(backend.put(q), *on, scale=0.125, backend=backend.name, out=out, check_finite=False)
    assert got is out
    np.testing.assert_allclose(backend.get(out), want, rtol=1e-4, atol=1e-4 * np.sqrt(d))
    for bad in (np.zeros((4, d), np.float16), np.zeros((3, d), np.float32)):
        with pytest.raises(ValueError, match="out must be float32 of shape"):
            tq.attention(backend.put(q), *on, scale=0.125, backend=backend.name, out=backend.put(bad))


def test_attention_reference_equals_dense_softmax() -> None:
    """The reference attention is softmax(scale q k^T) v over decoded K/V and the raw tail, per group."""
    rng = np.random.default_rng(0)
    k = kv_like(rng, (2, 8, 64))
    v = rng.standard_normal((2, 8, 64)).astype(np.float32)
    q = rng.standard_normal((6, 64)).astype(np.float32)
    kt, vt = rng.standard_normal((2, 2, 3, 64)).astype(np.float32)
    k_enc, v_enc = tq.encode(k, bits=3), tq.encode(v, bits=2.5, seed=9)
    out = tq.attention(q, k_enc, v_enc, scale=0.125, k_tail=kt, v_tail=vt)
    kk = np.concatenate([tq.decode(k_enc), kt], axis=1).astype(np.float64)
    vv = np.concatenate([tq.decode(v_enc), vt], axis=1).astype(np.float64)
    for h in range(6):
        logits = 0.125 * kk[h // 3] @ q[h]
        p = np.exp(logits - logits.max())
        np.testing.assert_allclose(out[h], (p / p.sum()) @ vv[h // 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_bytes_cross_backends(backend: BackendUnderTest, cfg) -> None:
    """Bytes written by this backend decode to the same values on the reference, and back."""
    bits, mode = cfg
    _supported("encode", backend.name, 64, bits, mode)
    streams, n = _shape(backend, 20)
    x = kv_like(np.random.default_rng(21), (streams, n, 64))
    enc = tq.encode(backend.put(x), bits=bits, mode=mode, seed=3, backend=backend.name)
    blob = enc.to_bytes()
    back = tq.Encoded.from_bytes(blob)
    assert back.to_bytes() == blob
    here = backend.get(tq.decode(enc, backend=backend.name))
    np.testing.assert_allclose(tq.decode(back, backend="numpy"), here, rtol=RTOL32,
                               atol=RTOL32 * float(np.abs(here).max()))


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("cfg", [(3.5, "mse"), (2.5, "prod")], ids=_ids)
def test_every_rotation_matches_reference(backend: BackendUnderTest, rotation: str, cfg) -> None:
    """Each rotation kind reaches every backend through the shared tables: records, decoded values,
    scores and attention equal the reference's for the same configuration."""
    bits, mode = cfg
    d = 64
    for op in ("encode", "decode", "scores", "attention"):
        _supported(op, backend.name, d, bits, mode)
    streams, n = _shape(backend, 29)
    rng = np.random.default_rng(31)
    x = kv_like(rng, (streams, n, d))
    ref = tq.encode(x, bits=bits, mode=mode, seed=13, rotation=rotation, backend="numpy")
    got = tq.encode(backend.put(x), bits=bits, mode=mode, seed=13, rotation=rotation, backend=backend.name)
    assert got.config == ref.config and ref.config.rotation == rotation
    ours, theirs = _fields(backend.get(got.records), ref.config), _fields(ref.records, ref.config)
    for key in theirs:
        if key.startswith(("norm", "gamma")):
            np.testing.assert_allclose(ours[key], theirs[key], rtol=2**-10, err_msg=key)
        else:
            assert np.mean(ours[key] != theirs[key]) <= MAX_CODE_MISMATCH, key
    enc = tq.Encoded(records=backend.put(ref.records), channels=backend.put(ref.channels), config=ref.config)
    want = tq.decode(ref, backend="numpy")
    scale = float(np.linalg.norm(want, axis=-1).max())
    np.testing.assert_allclose(backend.get(tq.decode(enc, backend=backend.name)), want, rtol=RTOL32,
                               atol=RTOL32 * scale)
    q = rng.standard_normal((streams, 3, d)).astype(np.float32)
    want_s = tq.scores(q, ref, backend="numpy")
    got_s = backend.get(tq.scores(backend.put(q), enc, backend=backend.name))
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-4 * scale * np.sqrt(d))
    v = rng.standard_normal((streams, n, d)).astype(np.float32)
    v_ref = tq.encode(v[:, None], bits=3.5, seed=14, rotation=rotation, backend="numpy")
    v_enc = tq.Encoded(records=backend.put(v_ref.records), channels=backend.put(v_ref.channels),
                       config=v_ref.config)
    k_ref = tq.Encoded(records=ref.records[:, None], channels=ref.channels[:, None], config=ref.config)
    k_enc = tq.Encoded(records=backend.put(k_ref.records), channels=backend.put(k_ref.channels),
                       config=ref.config)
    qa = q[:, :2]  # 2 query heads on 1 KV head
    want_a = tq.attention(qa, k_ref, v_ref, scale=d**-0.5, backend="numpy")
    got_a = backend.get(tq.attention(backend.put(qa), k_enc, v_enc, scale=d**-0.5, backend=backend.name))
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-4 * np.sqrt(d))
