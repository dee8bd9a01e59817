"""CuPy RawModule backend beyond the shared parity suite: odd sizes, strides, torch, graphs, devices.

GPU tests skip cleanly where CuPy or a CUDA device is missing; the import-hygiene and availability
tests run everywhere.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import tuning
from turboquant_codec.backends import availability as backend_availability
from turboquant_codec.backends import cupy_raw_tc, numpy_ref
from turboquant_codec.testing import NORM_RTOL
from turboquant_codec.tuning import CupyRawTuning

from .conftest import kv_like

_STATUS = backend_availability("cupy_raw")
gpu = pytest.mark.skipif(not _STATUS, reason=f"cupy_raw unavailable: {_STATUS.reason}")


def test_import_does_not_import_cupy() -> None:
    code = "import sys, turboquant_codec; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_availability_reason() -> None:
    if not _STATUS:
        assert _STATUS.reason.startswith(
            ("cupy not installed", "no CUDA device", "NVRTC missing", "cupy failed", "failed to import")
        ), _STATUS.reason


def _enc_on(e: tq.Encoded, put) -> tq.Encoded:
    ch = None if e.channels is None else put(e.channels)
    return tq.Encoded(records=put(e.records), channels=ch, config=e.config)


def _check_attention(q, k, v, tails, put) -> None:
    d = q.shape[-1]
    ke = tq.encode(k, bits=3.5, seed=1, backend="numpy")
    ve = tq.encode(v, bits=2.5, seed=2, backend="numpy")
    want = tq.attention(q, ke, ve, scale=d**-0.5, backend="numpy", **tails)
    got = tq.attention(put(q), _enc_on(ke, put), _enc_on(ve, put), scale=d**-0.5, backend="cupy_raw",
                       **{key: put(val) for key, val in tails.items()})
    np.testing.assert_allclose(tq._interop.to_numpy(got), want, rtol=1e-4, atol=1e-4 * np.sqrt(d))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 15, 17, 300, 4099])
def test_odd_sizes(n: int) -> None:
    import cupy as cp

    rng = np.random.default_rng(n)
    d = 128
    x = kv_like(rng, (2, n, d))
    for bits, mode in ((3.5, "mse"), (3, "prod")):
        ref = tq.encode(x, bits=bits, mode=mode, seed=4, backend="numpy")
        got = tq.encode(cp.asarray(x), bits=bits, mode=mode, seed=4, backend="cupy_raw")
        for g in ref.config.groups:
            a = numpy_ref._codes(cp.asnumpy(got.records), g)
            b = numpy_ref._codes(ref.records, g)
            assert np.mean(a != b) <= 1e-3
        host = tq.Encoded(cp.asnumpy(got.records),
                          None if got.channels is None else cp.asnumpy(got.channels), got.config)
        want = tq.decode(host, backend="numpy")
        np.testing.assert_allclose(cp.asnumpy(tq.decode(got, backend="cupy_raw")), want,
                                   rtol=2e-5, atol=2e-5 * float(np.abs(want).max()))
    k = kv_like(rng, (1, 2, n, d))
    v = rng.standard_normal((1, 2, n, d)).astype(np.float32)
    q = rng.standard_normal((1, 8, d)).astype(np.float32)
    _check_attention(q, k, v, {}, cp.asarray)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 12])
@pytest.mark.parametrize(("bits", "mode"), [(3.5, "mse"), (3.0, "prod")])
def test_attention_with_value_norms_past_float16(group: int, bits: float, mode: str) -> None:
    """Value norms of ~1e6, past float16's 65504 (the split's P' = p * value norm would overflow
    without its range factor), with one token in four of norm ~1 beside them: as the reference,
    finite. Groups 1 and 4 pack hi/lo halves in one mma, 12 does not."""
    import cupy as cp

    rng = np.random.default_rng(23 + group)
    d, n = 128, 4099
    k = kv_like(rng, (1, 2, n, d))
    size = np.where(np.arange(n) % 4 == 0, 1.0, 1e6)[:, None]
    v = (rng.standard_normal((1, 2, n, d)) / np.sqrt(d) * size).astype(np.float32)
    q = rng.standard_normal((1, 2 * group, d)).astype(np.float32)
    ke = tq.encode(k, bits=3.5, seed=1, backend="numpy")
    ve = tq.encode(v, bits=bits, mode=mode, seed=2, backend="numpy")
    want = tq.attention(q, ke, ve, scale=d**-0.5, backend="numpy")
    got = cp.asnumpy(tq.attention(cp.asarray(q), _enc_on(ke, cp.asarray), _enc_on(ve, cp.asarray),
                                  scale=d**-0.5, backend="cupy_raw"))
    assert np.isfinite(got).all() and np.abs(want).max() > 1e3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_very_long_sequence() -> None:
    import cupy as cp

    rng = np.random.default_rng(5)
    n, d = 70001, 64
    k = kv_like(rng, (1, 1, n, d))
    v = rng.standard_normal((1, 1, n, d)).astype(np.float32)
    q = rng.standard_normal((1, 4, d)).astype(np.float32)
    tails = {"k_tail": rng.standard_normal((1, 1, 40, d)).astype(np.float32),
             "v_tail": rng.standard_normal((1, 1, 40, d)).astype(np.float32)}
    _check_attention(q, k, v, tails, cp.asarray)


@gpu
@pytest.mark.gpu
def test_non_contiguous_inputs() -> None:
    import cupy as cp

    rng = np.random.default_rng(9)
    d = 64
    big = kv_like(rng, (2, 40, 2 * d))
    x_host = np.ascontiguousarray(big[:, ::2, :d])
    x_dev = cp.asarray(big)[:, ::2, :d]
    assert not x_dev.flags.c_contiguous
    ref = tq.encode(x_host, bits=3.5, seed=3, backend="numpy")
    got = tq.encode(x_dev, bits=3.5, seed=3, backend="cupy_raw")
    np.testing.assert_array_equal(cp.asnumpy(got.channels), ref.channels)
    assert np.mean(cp.asnumpy(got.records) != ref.records) < 0.01
    # Query heads strided, records offset by one token (16-byte misaligned rows).
    k = kv_like(rng, (1, 2, 51, d))
    v = rng.standard_normal((1, 2, 51, d)).astype(np.float32)
    q = rng.standard_normal((1, d, 8)).astype(np.float32).transpose(0, 2, 1)
    ke = tq.encode(k, bits=3.5, seed=1, backend="numpy")
    ve = tq.encode(v, bits=3.5, seed=2, backend="numpy")
    want = tq.attention(q, tq.Encoded(ke.records[:, :, 1:], ke.channels, ke.config),
                        tq.Encoded(ve.records[:, :, 1:], ve.channels, ve.config), scale=0.125,
                        backend="numpy")
    kd, vd = _enc_on(ke, cp.asarray), _enc_on(ve, cp.asarray)
    got = tq.attention(cp.asarray(q.transpose(0, 2, 1)).transpose(0, 2, 1),
                       tq.Encoded(kd.records[:, :, 1:], kd.channels, ke.config),
                       tq.Encoded(vd.records[:, :, 1:], vd.channels, ve.config), scale=0.125,
                       backend="cupy_raw")
    np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-4, atol=1e-4 * np.sqrt(d))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_cuda_tensors(dtype: str) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(2)
    d = 128
    x = torch.from_numpy(kv_like(rng, (2, 3, 33, d))).to("cuda", getattr(torch, dtype))
    enc = tq.encode(x, bits=3.5, seed=8)  # auto -> cupy_raw on a CUDA tensor
    assert isinstance(enc.records, torch.Tensor) and enc.records.is_cuda
    host = x.float().cpu().numpy()
    ref = tq.encode(host.astype(np.float32), bits=3.5, seed=8, backend="numpy")
    np.testing.assert_array_equal(enc.channels.cpu().numpy(), ref.channels)
    q = torch.randn(2, 12, d, device="cuda", dtype=getattr(torch, dtype))
    kt = torch.randn(2, 3, 5, d, device="cuda", dtype=getattr(torch, dtype))
    out = tq.attention(q, enc, enc, scale=d**-0.5, k_tail=kt, v_tail=kt, backend="cupy_raw")
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.float32
    host_enc = tq.Encoded(enc.records.cpu().numpy(), enc.channels.cpu().numpy(), enc.config)
    want = tq.attention(q.float().cpu().numpy(), host_enc, host_enc, scale=d**-0.5,
                        k_tail=kt.float().cpu().numpy(), v_tail=kt.float().cpu().numpy(), backend="numpy")
    # Softmax weights times value norms enter the value product as float16 (2**-12 relative):
    # with kv_like's 8x outlier channels used as values, that bounds the error by ~3e-4 max|v|.
    vmax = float(np.abs(tq.decode(host_enc, backend="numpy")).max())
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-4, atol=3e-4 * vmax)


@gpu
@pytest.mark.gpu
def test_attention_graph_capture() -> None:
    """The attention path has no host synchronisation: it records into a CUDA graph and replays."""
    import cupy as cp

    from turboquant_codec.backends import cupy_raw

    rng = np.random.default_rng(4)
    d = 128
    ke = tq.encode(kv_like(rng, (2, 2, 700, d)), bits=3.5, seed=1, backend="numpy")
    ve = tq.encode(rng.standard_normal((2, 2, 700, d)).astype(np.float32), bits=3.5, seed=2, backend="numpy")
    kd, vd = _enc_on(ke, cp.asarray), _enc_on(ve, cp.asarray)
    q = cp.asarray(rng.standard_normal((2, 8, d)).astype(np.float32))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        cupy_raw.attention(q, kd, vd, 0.1, None, None)  # compile and warm the memory pool
        stream.synchronize()
        stream.begin_capture()
        out = cupy_raw.attention(q, kd, vd, 0.1, None, None)
        graph = stream.end_capture()
        q[...] = cp.asarray(rng.standard_normal((2, 8, d)).astype(np.float32))
        graph.launch(stream)
        stream.synchronize()
    want = tq.attention(cp.asnumpy(q), ke, ve, scale=0.1, backend="numpy")
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=1e-4, atol=1e-4 * np.sqrt(d))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tail", [0, 7])
def test_public_attention_replay_follows_new_contents(tail: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated ``tq.attention(..., out=, check_finite=False)`` on the same torch CUDA tensors
    replays the prepared launches (the backend is not called) and reads new query and tail
    contents; another ``out`` goes through the backend again."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from turboquant_codec.backends import cupy_raw

    rng = np.random.default_rng()
    d = 128
    ke = tq.encode(kv_like(rng, (2, 2, 900, d)), bits=3.5, seed=1, backend="numpy")
    ve = tq.encode(rng.standard_normal((2, 2, 900, d)).astype(np.float32), bits=3.5, seed=2, backend="numpy")
    on = [tq.Encoded(torch.from_numpy(e.records).cuda(), torch.from_numpy(e.channels).cuda(), e.config)
          for e in (ke, ve)]
    q = torch.randn(2, 8, d, device="cuda", dtype=torch.bfloat16)
    tails = {}
    if tail:
        tails = {"k_tail": torch.randn(2, 2, tail, d, device="cuda", dtype=torch.bfloat16),
                 "v_tail": torch.randn(2, 2, tail, d, device="cuda", dtype=torch.bfloat16)}
    out = torch.full((2, 8, d), float("nan"), device="cuda")

    def call(o: Any) -> Any:
        return tq.attention(q, *on, scale=d**-0.5, out=o, check_finite=False, backend="cupy_raw", **tails)

    def want() -> np.ndarray:
        host = {key: t.float().cpu().numpy() for key, t in tails.items()}
        return tq.attention(q.float().cpu().numpy(), ke, ve, scale=d**-0.5, backend="numpy", **host)

    vmax = float(np.abs(tq.decode(ve, backend="numpy")).max())
    assert call(out) is out
    np.testing.assert_allclose(out.cpu().numpy(), want(), rtol=1e-4, atol=3e-4 * vmax)

    def backend_called(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the backend ran: no replay")

    monkeypatch.setattr(cupy_raw, "attention", backend_called)
    q.copy_(torch.randn_like(q))
    for t in tails.values():
        t.copy_(torch.randn_like(t))
    out.fill_(float("nan"))
    assert call(out) is out
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.cpu().numpy(), want(), rtol=1e-4, atol=3e-4 * vmax)
    with pytest.raises(AssertionError, match="no replay"):
        call(torch.empty_like(out))


@gpu
@pytest.mark.gpu
def test_second_device() -> None:
    """Inputs on the second GPU are encoded and attended there (kernels, tables and plans built for
    that device), with the reference's results."""
    import cupy as cp

    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU only")
    rng = np.random.default_rng(6)
    x = kv_like(rng, (2, 300, 128)).astype(np.float16)
    q = rng.standard_normal((1, 8, 128)).astype(np.float32)  # 4 query heads per KV head
    ref = tq.encode(x, bits=3.5, seed=2, backend="numpy")
    with cp.cuda.Device(1):
        xd, qd = cp.asarray(x), cp.asarray(q)
    enc = tq.encode(xd, bits=3.5, seed=2, backend="cupy_raw")
    assert enc.records.device.id == 1
    for g in ref.config.groups:
        codes = numpy_ref._codes(cp.asnumpy(enc.records), g)
        assert np.mean(codes != numpy_ref._codes(ref.records, g)) <= 1e-4
    kv = tq.Encoded(enc.records[None], enc.channels[None], enc.config)
    out = tq.attention(qd, kv, kv, scale=0.1, backend="cupy_raw")
    assert out.device.id == 1
    kv_ref = tq.Encoded(cp.asnumpy(enc.records)[None], cp.asnumpy(enc.channels)[None], enc.config)
    want = tq.attention(q, kv_ref, kv_ref, scale=0.1, backend="numpy")
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=1e-4, atol=1e-4 * np.sqrt(128))


# ------------------------------------------------------------------ tensor-core encode, emulated on the CPU
def _f32_toward_zero(a: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded toward zero (pessimistic model of tensor-core f32 accumulation)."""
    r = a.astype(np.float32)
    over = np.abs(r.astype(np.float64)) > np.abs(a)
    r[over] = np.nextafter(r[over], np.float32(0))
    return r


def tc_encode_emulated(x: np.ndarray, cfg, channels, rng: np.random.Generator | None = None) -> dict:
    """NumPy model of ``tq_encode_tc``'s arithmetic, built from the kernel's own fragment table.

    x: (N, d) float16/bfloat16/float32 values; channels: (d,) record order or None. Returns per group
    {"codes{g}": (N, G) codes, "norm{g}": (N,) bfloat16 norms}. Rotation fragments are read back from
    ``cupy_raw_tc.fragment_table`` through the kernel's index conventions (so the table layout is checked
    too); every mma adds its 16 exact products to the float32 accumulator rounded toward zero;
    rsqrt is off by up to 2 ulp (random sign) when ``rng`` is given.
    """
    from turboquant_codec.transforms import tables

    dtype = x.dtype.name
    xp = np.asarray(x).astype(np.float64)
    if channels is not None:
        xp = xp[:, np.asarray(channels, np.intp)]
    words = cupy_raw_tc.fragment_table(cfg, dtype)
    op = cupy_raw_tc.operand_dtype(dtype)
    out, start, at = {}, 0, 0
    for g, t in zip(cfg.groups, tables(cfg), strict=True):
        G = g.dim
        w = words[at: at + G * G].reshape(G // 8, G // 16, 32, 4)
        at += G * G
        # Rebuild the scaled hi/lo matrices as the kernel reads them (lane -> n, k conventions).
        halves = np.stack([w & 0xFFFF, w >> 16], axis=-1).astype(np.uint16).view(op)
        mats = [np.zeros((G, G)), np.zeros((G, G))]
        i_map, pos_map = cupy_raw_tc.positions(G)
        for part in range(2):  # hi: words 0-1, lo: words 2-3
            vals = halves[:, :, :, 2 * part: 2 * part + 2, :].astype(np.float64)
            mats[part][i_map, pos_map] = vals
        xg = xp[:, start: start + G]
        start += G
        # float32 and bfloat16 rows whose largest |x| lies outside 2^+-50 go in times 2^-e (2^e the
        # power of two at that largest |x|: exact); their norm comes out times 2^e.
        top = np.abs(xg).max(axis=-1)
        e_top = np.clip(np.floor(np.log2(np.where(top > 0, top, 1.0))), -126, 126)
        wide = (top > 0) & ((top < 2.0**-50) | (top >= 2.0**51)) & (dtype != "float16")
        up = np.where(wide, 2.0**e_top, 1.0)
        xg = (xg / up[:, None]).astype(np.float32)
        ss = np.sum(np.square(xg.astype(np.float32), dtype=np.float32), axis=-1, dtype=np.float32)
        rs = (1.0 / np.sqrt(ss.astype(np.float64))).astype(np.float32)
        if rng is not None:
            rs = (rs * (1 + rng.choice([-2.0, 2.0], rs.shape) * 2.0**-24)).astype(np.float32)
        nr = np.where(ss > 0, ss * rs, 0).astype(np.float32)
        # Only float32 input is scaled (by 2^-e, e the norm's exponent) and split into float16 parts.
        e = np.floor(np.log2(np.where(nr > 0, nr, 1.0))) if dtype == "float32" else np.zeros_like(nr)
        inv = np.where(ss > 0, (rs * 2.0 ** (e - cupy_raw_tc.RS_EXP)), 1.0).astype(np.float32)
        xs = (xg * 2.0**-e[:, None]).astype(np.float32)
        hi = xs.astype(op)
        lo = (xs - hi.astype(np.float32)).astype(op)
        parts = [(mats[0], hi), (mats[1], hi)] + ([(mats[0], lo)] if dtype == "float32" else [])
        acc = np.zeros((len(xg), G), np.float32)
        for ks in range(G // 16):
            cols = np.arange(16 * ks, 16 * ks + 16)
            for mat, xv in parts:
                prod = xv[:, cols].astype(np.float64) @ mat[:, cols].T
                acc = _f32_toward_zero(acc.astype(np.float64) + prod)
        # The kernel compares the exact product acc * inv (fused multiply-adds), through its grid.
        out[f"codes{g.index}"] = tc_grid_codes(acc.astype(np.float64) * inv[:, None], t.boundaries)
        out[f"norm{g.index}"] = (nr * up).astype(np.float32).astype(ml_dtypes.bfloat16)
    return out


def tc_grid_codes(y: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Codes of ``y`` (float64) through ``cupy_raw_tc.grid``, with the kernel's index arithmetic."""

    grid = cupy_raw_tc.grid(boundaries)
    k = np.clip(np.rint(y * float(grid.scale)).astype(np.int64) + grid.offset, 0, len(grid.bound) - 1)
    return grid.below[k].astype(np.int64) + (y > grid.bound[k])


@pytest.mark.parametrize("bits", [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
@pytest.mark.parametrize("d", [64, 128])
def test_tc_grid_counts_boundaries_below(d: int, bits: float) -> None:
    """Grid lookup + one comparison = the number of boundaries strictly below y, for random y over
    the whole unit-vector range, every boundary and its float32 neighbours, and every bin edge; at
    most one boundary per bin, clear of the bin edges by TC_GRID_MARGIN, and one bin per lane."""
    from turboquant_codec.config import CodecConfig
    from turboquant_codec.transforms import tables

    rng = np.random.default_rng(int(bits * 10) + d)
    for t in tables(CodecConfig(d, bits)):
        b = t.boundaries.astype(np.float32)
        grid = cupy_raw_tc.grid(b)
        assert len(grid.bound) <= cupy_raw_tc.GRID_BINS == 32
        pos = b.astype(np.float64) * float(grid.scale)
        assert np.all(np.abs(pos - np.rint(pos)) <= 0.5 - cupy_raw_tc.GRID_MARGIN)
        assert len(np.unique(np.rint(pos))) == len(b)  # one boundary per bin at most
        assert grid.below_is_index == (len(grid.bound) == len(b))
        edges = (np.arange(len(grid.bound) + 1) - grid.offset - 0.5) / float(grid.scale)
        y = np.concatenate([
            rng.uniform(-1.0, 1.0, 20000), rng.normal(0, 1 / np.sqrt(t.rotation.shape[0]), 20000),
            b, np.nextafter(b, np.float32(-1)), np.nextafter(b, np.float32(1)), edges,
            [-1.0, 1.0, 0.0]]).astype(np.float32).astype(np.float64)
        want = np.searchsorted(b.astype(np.float64), y, side="left")
        np.testing.assert_array_equal(tc_grid_codes(y, b), want)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2.5, 3.5, 4.0])
@pytest.mark.parametrize(("dtype", "scale"), [("float16", 1.0), ("bfloat16", 1.0), ("float32", 1.0),
                                              ("bfloat16", 1e-30), ("float32", 1e-30), ("float32", 1e30)])
def test_tc_encode_emulation_matches_reference(d: int, bits: float, dtype: str, scale: float) -> None:
    """The tensor-core encode's arithmetic (emulated) meets the parity suite's code tolerance, also
    for vectors whose float32 squares would overflow or underflow (scaled by a power of two)."""
    from turboquant_codec.config import CodecConfig

    cfg = CodecConfig(d, bits)
    assert cupy_raw_tc.tc_encode_ok(cfg)
    rng = np.random.default_rng(int(bits * 10) + d)
    x = kv_like(rng, (1, 400, d)) * rng.uniform(1e-3, 1e3, (1, 400, 1)).astype(np.float32)
    x = (x * np.float32(scale)).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    ref = tq.encode(x.astype(np.float32), bits=bits, seed=11, backend="numpy")
    got = tc_encode_emulated(x[0], ref.config, None if ref.channels is None else ref.channels[0], rng)
    for g in ref.config.groups:
        want = numpy_ref._codes(ref.records, g)[0]
        assert np.mean(got[f"codes{g.index}"] != want) <= 1e-4
        np.testing.assert_allclose(got[f"norm{g.index}"].astype(np.float64),
                                   numpy_ref._norms(ref.records, g, 0)[0], rtol=NORM_RTOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bits", [2.5, 4.0])
def test_tc_wgmma_table_is_the_fragment_table_in_core_matrices(bits: float, dtype: str) -> None:
    """The wgmma table holds every B[k][n] of the mma.sync fragment table (read through the fragment
    convention) at wgmma's no-swizzle K-major byte offset, and the grids unchanged after them."""
    from turboquant_codec.config import CodecConfig

    cfg = CodecConfig(128, bits)
    frag, wg = cupy_raw_tc.fragment_table(cfg, dtype), cupy_raw_tc.fragment_table(cfg, dtype, wgmma=True)
    assert frag.shape == wg.shape
    at = 0
    for g in cfg.groups:
        G, KS = g.dim, g.dim // 16
        w = frag[at: at + G * G].reshape(G // 8, KS, 32, 4)
        block = wg[at: at + G * G].view(np.uint16).reshape(2, KS, 16 * G)  # (part, k-step, 16-bit slots)
        at += G * G
        for nt, ks, lane, q in np.ndindex(w.shape):
            k, n = 2 * (lane % 4) + 8 * (q % 2), 8 * nt + lane // 4
            for half in (0, 1):
                byte = ((k + half) // 8) * cupy_raw_tc.WG_LBO + (n // 8) * cupy_raw_tc.WG_SBO \
                    + (n % 8) * 16 + ((k + half) % 8) * 2
                assert block[q // 2, ks, byte // 2] == (w[nt, ks, lane, q] >> (16 * half)) & 0xFFFF
    np.testing.assert_array_equal(wg[at:], frag[at:])


@pytest.mark.parametrize("wgmma", [False, True], ids=["mma", "wgmma"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bits", [2.5, 4.0])
def test_tc_encode_warps_fit_shared_memory(bits: float, dtype: str, wgmma: bool) -> None:
    """The encode's warps per block: as many as its shared memory holds (at most enc_tc_max_warps,
    whole warpgroups for wgmma); a forced count that does not fit is refused with the numbers, not
    left to a launch failure."""
    from turboquant_codec.backends import cupy_raw_tc
    from turboquant_codec.backends.occupancy import SM90_SMEM_OPTIN
    from turboquant_codec.config import CodecConfig

    cfg, optin, unit = CodecConfig(128, bits), SM90_SMEM_OPTIN, 4 if wgmma else 1
    default = CupyRawTuning()
    mt = cupy_raw_tc.encode_m_tiles(dtype, default)
    warps = cupy_raw_tc.encode_warps(cfg, dtype, optin, wgmma, default)
    assert unit <= warps <= default.enc_tc_max_warps and warps % unit == 0
    fixed, per_warp = cupy_raw_tc.encode_smem_parts(cfg, dtype, mt)
    assert cupy_raw_tc.encode_smem(cfg, dtype, warps, mt) == fixed + warps * per_warp <= optin
    small = fixed + 5 * per_warp  # a device with room for 5 warps
    assert cupy_raw_tc.encode_warps(cfg, dtype, small, wgmma, default) == (4 if wgmma else 5)
    six = CupyRawTuning(enc_tc_warps=6)
    with pytest.raises(ValueError, match="enc_tc_warps=6.*fits 1 to 5 warps"):
        cupy_raw_tc.encode_warps(cfg, dtype, small, wgmma, six)
    if wgmma:
        with pytest.raises(ValueError, match="whole warpgroups"):
            cupy_raw_tc.encode_warps(cfg, dtype, optin, wgmma, six)
    else:
        assert cupy_raw_tc.encode_warps(cfg, dtype, optin, wgmma, six) == 6


def test_codec_build_follows_the_encode_settings(monkeypatch) -> None:
    """The codec module is built for the launch the encode makes: sm_90a and whole warpgroups where
    wgmma is on, a changed enc_tc_warps or enc_tc_mt setting builds anew (no stale module for another
    block or tile size, nothing to clear), and each build opts its tq_encode_tc into the shared memory
    that launch uses."""
    from types import SimpleNamespace

    from turboquant_codec.backends import cupy_raw_build, cupy_raw_device, cupy_raw_tc
    from turboquant_codec.backends.occupancy import SM90_SMEM_OPTIN, STATIC_SMEM_LIMIT
    from turboquant_codec.config import CodecConfig

    built = []

    def build(device, source, options):
        fns = {"tq_encode_tc": SimpleNamespace(max_dynamic_shared_size_bytes=0)}
        built.append(options)
        return SimpleNamespace(options=options, get_function=fns.__getitem__)

    monkeypatch.setattr(cupy_raw_build, "module", build)
    monkeypatch.setattr(cupy_raw_device, "smem_optin", lambda device: SM90_SMEM_OPTIN)
    cupy_raw_build.codec_build.cache_clear()
    cfg = CodecConfig(128, 3.5)
    try:
        for wgmma, warps, mt in ((True, None, None), (False, None, None), (False, 8, None), (False, 8, 1)):
            settings = CupyRawTuning(enc_tc_wgmma=wgmma, enc_tc_warps=warps, enc_tc_mt=mt)
            with tuning.using(cupy_raw=settings):
                mod = cupy_raw_build.codec_module(0, cfg, "bfloat16")
            want_warps, want_mt = warps or settings.enc_tc_max_warps, mt or 2
            assert f"-DENC_WARPS={want_warps}" in mod.options and f"-DENC_MT={want_mt}" in mod.options
            assert ("-arch=sm_90a" in mod.options) == wgmma
            smem = mod.get_function("tq_encode_tc").max_dynamic_shared_size_bytes
            assert smem == cupy_raw_tc.encode_smem(cfg, "bfloat16", want_warps, want_mt) > STATIC_SMEM_LIMIT
            assert cupy_raw_build.tc_launch(0, cfg, "bfloat16", settings) == (wgmma, want_warps, want_mt)
            # The same settings find the same build.
            assert cupy_raw_build.codec_module(0, cfg, "bfloat16", settings) is mod
        assert len(built) == 4
    finally:
        cupy_raw_build.codec_build.cache_clear()


def test_tc_encode_predicate() -> None:
    from turboquant_codec.config import CodecConfig

    assert all(cupy_raw_tc.tc_encode_ok(CodecConfig(d, b)) for d in (64, 128) for b in (2.5, 3.5, 4.0, 1.0))
    assert not cupy_raw_tc.tc_encode_ok(CodecConfig(128, 3.5, "prod"))  # QJL: scalar kernel
    assert not cupy_raw_tc.tc_encode_ok(CodecConfig(32, 3.5))  # 16-channel groups
    assert not cupy_raw_tc.tc_encode_ok(CodecConfig(512, 4.0))  # 512-channel group


def _encode_both_paths(x: Any, cfg: Any, ch: Any) -> dict[str, Any]:
    """Device records of ``x`` from the tensor-core encode ("auto") and the scalar one."""
    from turboquant_codec.backends import cupy_raw

    out = {}
    for path in ("auto", "scalar"):
        with tuning.using(cupy_raw=CupyRawTuning(encode_path=path)):
            out[path], _ = cupy_raw.encode(cupy_raw.asarray(x), cfg, ch)
    return out


def _fields_close(got: np.ndarray, want: np.ndarray, cfg: Any, path: str) -> None:
    """Codes within the encode's tolerance of the reference's; norms one bfloat16 step at most, and
    |x_g| exactly equal from the scalar encode (float64 norms of the same values rounded once, as the
    reference rounds; its QJL residual comes from float32 codes, so one step there too)."""
    for g in cfg.groups:
        assert np.mean(numpy_ref._codes(got, g) != numpy_ref._codes(want, g)) <= 1e-4, path
        for which in range(2 if g.qjl else 1):
            ours, theirs = numpy_ref._norms(got, g, which), numpy_ref._norms(want, g, which)
            if path == "scalar" and which == 0:
                np.testing.assert_array_equal(ours, theirs)
            else:
                np.testing.assert_allclose(ours, theirs, rtol=NORM_RTOL)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scale", [1e-30, 1e-9, 1.0, 1e30], ids=lambda s: f"x{s:g}")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_encode_tiny_and_huge_vectors(dtype: str, scale: float) -> None:
    """Both encode kernels at magnitudes whose float32 squares underflow or overflow (the tensor-core
    encode scales such warp tiles by a power of two): codes and norms as the reference's, whose
    error does not depend on scale (``test_backends``), and the same relative error decoded on the
    GPU. One tile in four is unit-sized (scaled and unscaled tiles side by side in one launch)."""
    import cupy as cp

    from turboquant_codec.config import CodecConfig

    rng = np.random.default_rng(17)
    unit = kv_like(rng, (2, 515, 128))
    size = np.where(np.arange(515) % 64 < 16, 1.0, scale).astype(np.float32)[None, :, None]
    x = (unit * size).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    x32 = x.astype(np.float32)
    for bits, mode in ((3.5, "mse"), (4.0, "mse"), (3.0, "prod")):
        cfg = CodecConfig(128, bits, mode, seed=2)
        ref = tq.encode(x32, bits=bits, mode=mode, seed=2, backend="numpy")
        ch = None if ref.channels is None else cp.asarray(ref.channels)
        for path, rec in _encode_both_paths(x, cfg, ch).items():
            _fields_close(cp.asnumpy(rec), ref.records, cfg, path)
            for g in cfg.groups:
                assert np.all(numpy_ref._norms(ref.records, g, 0) > 0)
            enc = tq.Encoded(records=rec, channels=ch, config=cfg)
            errors = []
            for back in (cp.asnumpy(tq.decode(enc, backend="cupy_raw")), tq.decode(ref)):
                diff = back.astype(np.float64) - x32
                errors.append(np.mean(np.sum(diff**2, -1) / np.sum(x32.astype(np.float64) ** 2, -1)))
            assert abs(errors[0] / errors[1] - 1) < 0.02, (bits, mode, path, errors)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2.5, 3.5, 4.0])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tc_encode_matches_reference_and_scalar(d: int, bits: float, dtype: str) -> None:
    """tq_encode_tc (tensor cores) and tq_encode (scalar) against the reference, every input dtype,
    odd vector counts (partial tiles), several streams."""
    import cupy as cp

    from turboquant_codec.config import CodecConfig

    rng = np.random.default_rng(int(bits * 10) + d)
    x = kv_like(rng, (3, 1001, d)) * rng.uniform(1e-2, 1e2, (3, 1001, 1)).astype(np.float32)
    x = x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    ref = tq.encode(x.astype(np.float32), bits=bits, seed=6, backend="numpy")
    cfg = CodecConfig(d, bits, seed=6)
    assert cupy_raw_tc.tc_encode_ok(cfg)
    ch = None if ref.channels is None else cp.asarray(ref.channels)
    for path, rec in _encode_both_paths(x, cfg, ch).items():
        got = cp.asnumpy(rec)
        _fields_close(got, ref.records, cfg, path)
        used = 2 * len(cfg.groups) + sum(g.code_bytes for g in cfg.groups)
        assert not got[..., used:].any()
