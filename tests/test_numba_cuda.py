"""Numba CUDA backend beyond the shared parity suite.

Under the CUDA simulator (tiny shapes): every declared head dimension, bfloat16 inputs, multi-split
attention. On a real GPU (skipped elsewhere): realistic shapes, d = 64 and 128, up to 1M vectors,
GQA groups 1, 4 and 8, float32/float16/bfloat16 inputs through torch CUDA tensors (zero-copy).
"""

from __future__ import annotations

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import _interop
from turboquant_codec import backends as registry
from turboquant_codec.backends import numpy_ref
from turboquant_codec.capabilities import CAPABILITIES
from turboquant_codec.testing import NORM_RTOL

from .conftest import kv_like

NAME = "numba_cuda"
# Boundary ties are the only allowed code disagreement between float32 and float64 encoders.
MAX_CODE_MISMATCH = 1e-3
# Decoding is a float32 product over g <= 128 terms: a few ulps of the vector's scale.
RTOL32 = 2e-5
# Attention: float32 logits (d terms) and a float32 softmax-weighted sum over n + t tokens; inputs
# of every dtype are exactly representable in float64, so the reference sees the same values and
# only float32 accumulation differs (observed ~1e-6 relative); 1e-4 leaves headroom without hiding
# an indexing or softmax bug, which shows up at 1e-1.
ATTN_RTOL = 1e-4


def _status() -> tuple[bool, bool]:
    """(available, simulated)."""
    ok = bool(registry.availability(NAME))
    if not ok:
        return False, False
    from numba import config

    return True, bool(config.ENABLE_CUDASIM)


AVAILABLE, SIMULATED = _status()
needs_backend = pytest.mark.skipif(not AVAILABLE, reason=f"{NAME}: {registry.availability(NAME).reason}")
needs_gpu = pytest.mark.skipif(not AVAILABLE or SIMULATED, reason="needs a CUDA GPU")


def _fields_match(records: np.ndarray, ref: tq.Encoded) -> None:
    cfg = ref.config
    assert records.shape == ref.records.shape
    for g in cfg.groups:
        ours, theirs = numpy_ref._codes(records, g), numpy_ref._codes(ref.records, g)
        assert np.mean(ours != theirs) <= MAX_CODE_MISMATCH
        np.testing.assert_allclose(numpy_ref._norms(records, g, 0), numpy_ref._norms(ref.records, g, 0),
                                   rtol=NORM_RTOL)
        if g.qjl:
            signs = numpy_ref._signs(records, g) != numpy_ref._signs(ref.records, g)
            assert np.mean(signs) <= MAX_CODE_MISMATCH


def _to_device(x: np.ndarray):
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(x))


# ------------------------------------------------------------------------------- simulator-sized
@needs_backend
@pytest.mark.parametrize("d", CAPABILITIES["encode"][NAME].head_dims, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("bits,mode", [(2.5, "mse"), (3.5, "prod")])
def test_every_declared_head_dim(d: int, bits: float, mode: str) -> None:
    x = kv_like(np.random.default_rng(d), (1, 2, d))
    ref = tq.encode(x, bits=bits, mode=mode, seed=4, backend="numpy")
    got = tq.encode(_to_device(x), bits=bits, mode=mode, seed=4, backend=NAME)
    _fields_match(_interop.to_numpy(got.records), ref)
    np.testing.assert_array_equal(_interop.to_numpy(got.channels), ref.channels)
    want = tq.decode(ref, backend="numpy")
    back = _interop.to_numpy(tq.decode(ref, backend=NAME))
    np.testing.assert_allclose(back, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())


@needs_backend
@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30], ids=lambda s: f"x{s:g}")
def test_bfloat16_bits_are_read_as_bfloat16(scale: float) -> None:
    """Also at magnitudes whose float32 squares would underflow or overflow."""
    import ml_dtypes

    x = (kv_like(np.random.default_rng(1), (1, 3, 64)) * np.float32(scale)).astype(ml_dtypes.bfloat16)
    ref = tq.encode(x.astype(np.float32), bits=3.5, seed=2, backend="numpy")
    got = tq.encode(x, bits=3.5, seed=2, backend=NAME)  # host bfloat16: asarray copies its bits
    _fields_match(_interop.to_numpy(got.records), ref)


@needs_backend
def test_every_bfloat16_norm_word_decodes_exactly() -> None:
    """The kernels' shift-and-multiply reading of a stored norm equals the word's float32 value: every
    subnormal, and every exponent with its smallest, largest and two middle significands."""
    global cuda  # the simulator swaps a kernel's module-global ``cuda``, not a closure's
    from numba import cuda

    from turboquant_codec.backends.numba_kernels import _bf16_value

    @cuda.jit
    def read(words, out):  # pragma: no cover - runs on the device
        i = cuda.grid(1)
        if i < words.size:
            out[i] = _bf16_value(words[i])

    exponents = np.arange(1, 255, dtype=np.int32)[:, None] << 7
    words = np.concatenate([np.arange(128), (exponents | [0, 1, 0x40, 0x7F]).ravel()]).astype(np.int32)
    out = cuda.device_array(words.size, np.float32)
    read[(words.size + 255) // 256, 256](_to_device(words), out)
    np.testing.assert_array_equal(out.copy_to_host(), (words.astype(np.uint32) << 16).view(np.float32))


@needs_backend
def test_attention_over_several_splits_and_tail() -> None:
    """Split-K merging: 3 compressed splits plus the raw tail split, GQA group of 2."""
    from turboquant_codec.backends import numba_cuda

    rng = np.random.default_rng(5)
    d, n, t = 32, 20, 3
    k, v = kv_like(rng, (1, 1, n, d)), rng.standard_normal((1, 1, n, d)).astype(np.float32)
    q = rng.standard_normal((1, 2, d)).astype(np.float32)
    kt, vt = rng.standard_normal((2, 1, 1, t, d)).astype(np.float32)
    k_enc = tq.encode(k, bits=3, mode="prod", seed=1, backend="numpy")
    v_enc = tq.encode(v, bits=3.5, seed=2, backend="numpy")
    want = tq.attention(q, k_enc, v_enc, scale=0.2, k_tail=kt, v_tail=vt, backend="numpy")

    def dev(e: tq.Encoded) -> tq.Encoded:
        ch = None if e.channels is None else _to_device(e.channels)
        return tq.Encoded(records=_to_device(e.records), channels=ch, config=e.config)

    got = numba_cuda.attention(_to_device(q), dev(k_enc), dev(v_enc), 0.2, _to_device(kt),
                               _to_device(vt), split_tokens=8)
    np.testing.assert_allclose(_interop.to_numpy(got), want, rtol=ATTN_RTOL, atol=ATTN_RTOL * np.sqrt(d))


# ------------------------------------------------------------------------------------ GPU only
def _torch_cuda(x: np.ndarray, dtype: str):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch.from_numpy(np.ascontiguousarray(x)).to("cuda").to(getattr(torch, dtype))


def _exact(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float32: what the GPU reads, for the reference."""
    import ml_dtypes

    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return x.astype(target).astype(np.float32)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("d,n,bits,mode,dtype", [
    (128, 1 << 20, 3.5, "mse", "float16"), (64, 1 << 18, 2.5, "mse", "bfloat16"),
    (128, 1 << 17, 4, "prod", "bfloat16"), (64, 1 << 17, 3, "mse", "float32"),
])
def test_gpu_encode_decode_realistic(d: int, n: int, bits: float, mode: str, dtype: str) -> None:
    """Whole-array encode/decode on the GPU; the float64 reference checks every ``stride``-th vector
    (it runs ~20 s per 2^18 vectors on the host), with the channel choice checked over all of them."""
    rng = np.random.default_rng(n + d)
    x = _exact(kv_like(rng, (2, n // 2, d)), dtype)
    cfg = tq.CodecConfig(d=d, bits=bits, mode=mode, seed=9)
    channels = numpy_ref.select_channels(x, cfg) if cfg.split else None
    got = tq.encode(_torch_cuda(x, dtype), bits=bits, mode=mode, seed=9, backend=NAME)
    if channels is not None:
        np.testing.assert_array_equal(_interop.to_numpy(got.channels), channels)
    stride = max(1, n // (1 << 15))
    ref = tq.encode(x[:, ::stride], bits=bits, mode=mode, seed=9, channels=channels, backend="numpy")
    records = _interop.to_numpy(got.records)
    _fields_match(records[:, ::stride], ref)
    back = _interop.to_numpy(tq.decode(got, backend=NAME))[:, ::stride]
    want = tq.decode(tq.Encoded(np.ascontiguousarray(records[:, ::stride]), channels, cfg), backend="numpy")
    scale = np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(back, want, rtol=RTOL32, atol=RTOL32 * scale.max())


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gpu_attention_realistic(groups: int, d: int, dtype: str) -> None:
    rng = np.random.default_rng(groups * d)
    b, h_kv, n, t = 2, 4, 2000, 64
    k = kv_like(rng, (b, h_kv, n, d))
    v = rng.standard_normal((b, h_kv, n, d)).astype(np.float32)
    q = _exact((rng.standard_normal((b, h_kv * groups, d)) * 2).astype(np.float32), dtype)
    kt = _exact(rng.standard_normal((b, h_kv, t, d)).astype(np.float32), dtype)
    vt = _exact(rng.standard_normal((b, h_kv, t, d)).astype(np.float32), dtype)
    k_enc = tq.encode(k, bits=3.5, seed=1, backend="numpy")
    v_enc = tq.encode(v, bits=3.5, mode="prod", seed=2, backend="numpy")
    scale = d**-0.5
    want = tq.attention(q, k_enc, v_enc, scale=scale, k_tail=kt, v_tail=vt, backend="numpy")

    def dev(e: tq.Encoded) -> tq.Encoded:
        return tq.Encoded(records=_torch_cuda(e.records, "uint8"),
                          channels=_torch_cuda(e.channels.astype(np.int32), "int32"), config=e.config)

    got = tq.attention(_torch_cuda(q, dtype), dev(k_enc), dev(v_enc), scale=scale,
                       k_tail=_torch_cuda(kt, dtype), v_tail=_torch_cuda(vt, dtype), backend=NAME)
    assert got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=ATTN_RTOL, atol=ATTN_RTOL * np.sqrt(d))
    qg = q.reshape(b, h_kv, groups, d)  # scores: the queries of each KV head against its keys
    s_want = tq.scores(qg, k_enc, backend="numpy")
    s_got = tq.scores(_torch_cuda(qg, dtype), dev(k_enc), backend=NAME).cpu().numpy()
    bound = RTOL32 * np.linalg.norm(qg, axis=-1)[..., None] * np.linalg.norm(k, axis=-1).max()
    assert np.all(np.abs(s_got - s_want) <= bound + RTOL32 * np.abs(s_want))


@needs_backend
def test_device_of_an_input_comes_from_its_library(monkeypatch) -> None:
    """On a multi-GPU host the GPU of an input is asked of its library (the driver's pointer query
    answered 0 for a torch tensor on cuda:1), whichever object the view wraps."""
    from types import SimpleNamespace

    from turboquant_codec.backends import numba_cuda
    from turboquant_codec.backends.numba_launch import DeviceView

    monkeypatch.setattr(numba_cuda, "_simulated", lambda: False)
    monkeypatch.setattr(numba_cuda, "_gpu_count", lambda: 4)
    torch_like = type("Tensor", (), {"__module__": "torch", "device": SimpleNamespace(index=3)})()
    cupy_like = type("ndarray", (), {"__module__": "cupy", "device": SimpleNamespace(id=2)})()
    buffer_like = SimpleNamespace(device_id=1)
    for owner, want in ((torch_like, 3), (cupy_like, 2), (buffer_like, 1)):
        assert numba_cuda._device_id(DeviceView(4096, (2, 3), np.float32, owner)) == want
        assert numba_cuda._device_id(DeviceView(4096, (6,), np.uint8, owner).reshape(2, 3)) == want


@needs_backend
@pytest.mark.parametrize(
    ("regs", "warps", "per_sm"),
    [
        (64, 4, 32),  # the WARPS_PER_SM cap binds (registers would allow 32 too)
        (128, 4, 16),  # registers: 4096 per warp, 4 blocks of 4 warps in 65536
        (72, 3, 27),  # registers, rounded per warp to 2304: 9 blocks of 3 warps
        (255, 8, 8),  # registers, 8192 per warp: one block of 8 warps
    ],
    ids=["cap", "regs-128", "regs-72", "regs-255"],
)
def test_resident_warps_counts_whole_blocks(monkeypatch, regs: int, warps: int, per_sm: int) -> None:
    """The warp attention's split count aims at the warps the GPU holds in whole blocks, per SM the
    fewer of the register limit and WARPS_PER_SM (the simulator answers the cap on 132 SMs)."""
    from turboquant_codec.backends import numba_cuda

    monkeypatch.setattr(numba_cuda, "_sm_count", lambda device: 7)
    assert numba_cuda._resident_warps(regs, warps, 0) == 7 * per_sm
    assert numba_cuda._resident_warps(None, warps, 0) == 132 * numba_cuda.WARPS_PER_SM


@needs_gpu
@pytest.mark.gpu
def test_second_device() -> None:
    """Inputs on cuda:1 are computed there (kernels loaded and outputs allocated on that GPU) and
    agree with the reference, while cuda:0 stays the current device."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU only")
    rng = np.random.default_rng(12)
    d = 64
    k, v = kv_like(rng, (2, 2, 300, d)), rng.standard_normal((2, 2, 300, d)).astype(np.float32)
    q = rng.standard_normal((2, 4, d)).astype(np.float32)
    on1 = [torch.from_numpy(a).to("cuda:1") for a in (k, v, q)]
    assert torch.cuda.current_device() == 0
    k_enc = tq.encode(on1[0], bits=3.5, seed=3, backend=NAME)
    v_enc = tq.encode(on1[1], bits=3.5, seed=4, backend=NAME)
    assert k_enc.records.device.index == 1 and k_enc.channels.device.index == 1
    back = tq.decode(k_enc, backend=NAME)
    out = tq.attention(on1[2], k_enc, v_enc, scale=d**-0.5, backend=NAME)
    assert back.device.index == 1 and out.device.index == 1
    host = [tq.Encoded(e.records.cpu().numpy(), e.channels.cpu().numpy(), e.config) for e in (k_enc, v_enc)]
    _fields_match(host[0].records, tq.encode(k, bits=3.5, seed=3, channels=host[0].channels, backend="numpy"))
    want = tq.attention(q, *host, scale=d**-0.5, backend="numpy")
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=ATTN_RTOL, atol=ATTN_RTOL * np.sqrt(d))
    np.testing.assert_allclose(back.cpu().numpy(), tq.decode(host[0], backend="numpy"), rtol=RTOL32,
                               atol=RTOL32 * float(np.linalg.norm(k, axis=-1).max()))


@needs_backend
@pytest.mark.parametrize("kv", [((3.5, "mse"), (3.5, "prod")), ((4, "prod"), (2, "mse"))],
                         ids=["k-mse3.5-v-prod3.5", "k-prod4-v-mse2"])
def test_warp_attention_tiles_and_splits(kv) -> None:
    """The warp kernel: several 32-key tiles per split (last one partial), several splits, QJL
    columns on either side, GQA group of 2, no tail (the warp kernel alone writes the partials)."""
    from turboquant_codec.backends import numba_cuda, numba_warp_attention

    (kb, km), (vb, vm) = kv
    rng = np.random.default_rng(8)
    d, n = 32, 75
    k, v = kv_like(rng, (1, 1, n, d)), rng.standard_normal((1, 1, n, d)).astype(np.float32)
    q = (rng.standard_normal((1, 2, d)) * 2).astype(np.float32)
    k_enc = tq.encode(k, bits=kb, mode=km, seed=1, backend="numpy")
    v_enc = tq.encode(v, bits=vb, mode=vm, seed=2, backend="numpy")
    assert numba_warp_attention.fast_attention_kernel(k_enc.config, v_enc.config, 2) is not None
    want = tq.attention(q, k_enc, v_enc, scale=0.3, backend="numpy")

    def dev(e: tq.Encoded) -> tq.Encoded:
        ch = None if e.channels is None else _to_device(e.channels)
        return tq.Encoded(records=_to_device(e.records), channels=ch, config=e.config)

    for split in (64, None):  # 2 splits of 2 tiles (the second split's last tile has 11 keys), default
        got = numba_cuda.attention(_to_device(q), dev(k_enc), dev(v_enc), 0.3, None, None,
                                   split_tokens=split)
        np.testing.assert_allclose(_interop.to_numpy(got), want, rtol=ATTN_RTOL,
                                   atol=ATTN_RTOL * np.sqrt(d))
