"""numba_cuda launches, allocates and reads back on the caller's current stream (``_interop.current_stream``:
CuPy's, else torch's), as cupy_raw does.

On the simulator, which has no external streams, the caller's stream handle is faked: every kernel
launch must name the Numba stream made for that handle and every read-back must wait on it. On a GPU,
work queued ahead on a torch side stream (a sleep, then the query's new contents) must be seen by a
call made on that stream: a launch on the legacy default stream would not wait for it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import _interop
from turboquant_codec.backends import numpy_ref

from .conftest import kv_like
from .test_numba_cuda import _fields_match
from .test_numba_paged import (
    AVAILABLE,
    NAME,
    SIMULATED,
    _check_attention,
    _check_write,
    _numba,
    _reference,
    _scene,
)

HANDLE = 0x5EED
ATTN_RTOL = 1e-4
sim_only = pytest.mark.skipif(not (AVAILABLE and SIMULATED), reason="needs Numba's CUDA simulator")
needs_gpu = pytest.mark.skipif(not AVAILABLE or SIMULATED, reason="needs a CUDA GPU")


def test_current_stream_is_cupys_then_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy's current stream when it is not the default one, else torch's once torch's CUDA is
    initialised, else the legacy default stream (0); neither library is imported for it."""
    cupy_ptr = {"ptr": 0}
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        get_current_stream=lambda device: types.SimpleNamespace(ptr=cupy_ptr["ptr"] * (device + 1))))
    torch_state = {"initialised": False}
    torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_initialized=lambda: torch_state["initialised"]),
        _C=types.SimpleNamespace(_cuda_getCurrentRawStream=lambda device: 7000 + device))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setitem(sys.modules, "torch", torch)
    assert _interop.current_stream(0) == 0  # torch not initialised, CuPy not imported
    torch_state["initialised"] = True
    assert _interop.current_stream(1) == 7001
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert _interop.current_stream(1) == 7001  # CuPy's is the default stream (handle 0)
    cupy_ptr["ptr"] = 500
    assert _interop.current_stream(1) == 1000


@pytest.fixture
def caller_stream(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any], list[int]]:
    """(the caller's Numba stream, the stream of every kernel launch, read-backs synchronised)."""
    from numba import cuda
    from numba.cuda.simulator import kernel as sim_kernel

    from turboquant_codec.backends import numba_launch

    caller = cuda.stream()
    synced: list[int] = []
    wait = caller.synchronize
    caller.synchronize = lambda: (synced.append(1), wait())[1]

    def external(ptr: int) -> Any:
        assert ptr == HANDLE, f"a stream other than the caller's: {ptr:#x}"
        return caller

    monkeypatch.setattr(_interop, "current_stream", lambda device: HANDLE)
    monkeypatch.setattr(cuda, "external_stream", external)
    monkeypatch.setattr(numba_launch, "_NUMBA_STREAMS", {})
    used: list[Any] = []
    getitem = sim_kernel.FakeCUDAKernel.__getitem__

    def record(self: Any, configuration: Any) -> Any:
        used.append(configuration[2] if len(configuration) > 2 else 0)
        return getitem(self, configuration)

    monkeypatch.setattr(sim_kernel.FakeCUDAKernel, "__getitem__", record)
    return caller, used, synced


@sim_only
def test_codec_ops_use_the_callers_stream(caller_stream: tuple[Any, list[Any], list[int]]) -> None:
    """encode (channel choice and norm-overflow read-backs), decode and attention: every launch on
    the caller's stream, every read-back after it; results equal the reference."""
    caller, used, synced = caller_stream
    rng = np.random.default_rng(31)
    d = 32
    k, v = kv_like(rng, (1, 2, 40, d)), rng.standard_normal((1, 2, 40, d)).astype(np.float32)
    q = rng.standard_normal((1, 4, d)).astype(np.float32)
    k_enc = tq.encode(k, bits=3.5, seed=1, backend=NAME)
    v_enc = tq.encode(v, bits=3.5, seed=2, backend=NAME)
    got = _interop.to_numpy(tq.attention(q, k_enc, v_enc, scale=0.2, backend=NAME))
    back = _interop.to_numpy(tq.decode(k_enc, backend=NAME))
    assert len(used) >= 6 and all(stream is caller for stream in used)
    assert len(synced) >= 4  # per encode: the channel energies and the overflow flag
    host = [tq.Encoded(_interop.to_numpy(e.records), _interop.to_numpy(e.channels), e.config)
            for e in (k_enc, v_enc)]
    np.testing.assert_array_equal(host[0].channels, numpy_ref.select_channels(k, host[0].config))
    want = tq.attention(q, *host, scale=0.2, backend="numpy")
    np.testing.assert_allclose(got, want, rtol=ATTN_RTOL, atol=ATTN_RTOL * np.sqrt(d))
    np.testing.assert_allclose(back, tq.decode(host[0], backend="numpy"), rtol=1e-4, atol=1e-4)


@sim_only
def test_paged_ops_use_the_callers_stream(caller_stream: tuple[Any, list[Any], list[int]]) -> None:
    """paged_write (gather, encode, scatter, raw copies; the padding read-back) and paged_attention:
    every launch on the caller's stream; results equal the reference."""
    caller, used, synced = caller_stream
    fresh = _scene(5, 32, (3.5, "mse"), (3.0, "mse"), np.float32, history=False)  # channels chosen here
    _check_write(fresh)
    writes = len(used)
    assert writes >= 4 and synced
    scene = _scene(6, 32, (3.5, "mse"), (3.0, "mse"), np.float32)
    numpy_ref.paged_write(scene.host_cache(), scene.key, scene.value, scene.slot_mapping)
    _check_attention(_numba(scene), _reference(scene), scene)
    assert len(used) > writes and all(stream is caller for stream in used)


@needs_gpu
@pytest.mark.gpu
def test_gpu_calls_wait_for_work_queued_on_torchs_stream() -> None:
    """On a torch side stream: a long sleep, then the query's new contents, then tq.attention and
    tq.encode. Launched on the caller's stream they see the new contents; on the legacy default
    stream (which does not wait for torch's non-blocking streams) they would read the old ones."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(32)
    d = 64
    k, v = kv_like(rng, (2, 2, 700, d)), rng.standard_normal((2, 2, 700, d)).astype(np.float32)
    q_old, q_new = (rng.standard_normal((2, 8, d)).astype(np.float32) for _ in range(2))
    x_old, x_new = (kv_like(rng, (2, 2, 300, d)) for _ in range(2))
    k_enc = tq.encode(torch.from_numpy(k).cuda(), bits=3.5, seed=3, backend=NAME)
    v_enc = tq.encode(torch.from_numpy(v).cuda(), bits=3.5, seed=4, backend=NAME)
    q_t, x_t = torch.from_numpy(q_old).cuda(), torch.from_numpy(x_old).cuda()
    tq.attention(q_t, k_enc, v_enc, scale=d**-0.5, backend=NAME)  # warm-up: kernels built, tables up
    tq.encode(x_t, bits=3.5, seed=5, channels=k_enc.channels, backend=NAME)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        q_t.copy_(torch.from_numpy(q_new).cuda(non_blocking=False))
        x_t.copy_(torch.from_numpy(x_new).cuda(non_blocking=False))
        out = tq.attention(q_t, k_enc, v_enc, scale=d**-0.5, backend=NAME, check_finite=False)
        enc = tq.encode(x_t, bits=3.5, seed=5, channels=k_enc.channels, backend=NAME, check_finite=False)
    side.synchronize()
    host = [tq.Encoded(e.records.cpu().numpy(), e.channels.cpu().numpy(), e.config) for e in (k_enc, v_enc)]
    want = tq.attention(q_new, *host, scale=d**-0.5, backend="numpy")
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=ATTN_RTOL, atol=ATTN_RTOL * np.sqrt(d))
    # x_new's records (codes up to boundary ties, norms to float16 rounding), not x_old's.
    _fields_match(enc.records.cpu().numpy(),
                  tq.encode(x_new, bits=3.5, seed=5, channels=host[0].channels, backend="numpy"))
