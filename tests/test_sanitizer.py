"""The GPU kernels under hostile metadata: no read or write outside the cache, no other request
touched. Meant to run under CUDA's memory checker, which reports any out-of-bounds access::

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -p no:cacheprovider \
        tests/test_sanitizer.py

(the assertions here check what the kernels compute; the sanitizer checks where they read and
write). Backends: cupy_raw (CuPy arrays, the vLLM packed layout: the fused decode kernels) and
numba_cuda (Numba device arrays); both need a CUDA device. The rules they follow
(``turboquant_codec.paged``): on the decode path (``num_decodes`` given) GPU metadata is not read
on the host, and the kernels skip block ids outside the cache, raw rows outside the pool and slots
outside the cache (a skipped context token is masked out), clamp context lengths to the block table
and leave a request whose rows the step does not hold unwritten; channel lists are clamped to the
head dimension. Without ``num_decodes`` the public API checks the values on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import CodecConfig, PagedCache
from turboquant_codec import backends as registry

pytestmark = pytest.mark.gpu

D, H, GROUP, BS, NB, NUM_RAW = 64, 2, 2, 16, 8, 3
CTX = (20, 40, 7)  # cached tokens of the three decode requests
SENTINEL = 7.0
I32_MAX, I32_MIN = 2**31 - 1, -(2**31)


def _real_gpu(name: str) -> None:
    status = registry.availability(name)
    if not status:
        pytest.skip(f"{name} unavailable: {status.reason}")
    from numba import config

    if name == "numba_cuda" and config.ENABLE_CUDASIM:
        pytest.skip("needs a CUDA device (in the simulator the public API takes Numba arrays for host "
                    "arrays and checks their values; no memory checker runs there)")


@dataclass
class Lib:
    """Where a backend reads its inputs: ``put`` a host array there, ``get`` one back."""

    name: str
    put: Callable[[np.ndarray], Any]
    get: Callable[[Any], np.ndarray]
    packed: bool  # K and V as views of one packed [NB, H, BS, R_k + R_v] array (vLLM's layout)


@pytest.fixture(params=["cupy_raw", "numba_cuda"])
def lib(request: pytest.FixtureRequest) -> Iterator[Lib]:
    name = request.param
    _real_gpu(name)
    if name == "cupy_raw":
        import cupy

        # Without CuPy's pool every array is its own allocation, so the memory checker sees an
        # access past an array (inside a pooled chunk it would not).
        pool = cupy.cuda.get_allocator()
        cupy.cuda.set_allocator(None)
        yield Lib(name, lambda a: cupy.asarray(np.ascontiguousarray(a)), cupy.asnumpy, True)
        cupy.cuda.set_allocator(pool)
        return
    from numba import cuda

    yield Lib(name, lambda a: cuda.to_device(np.ascontiguousarray(a)), lambda a: a.copy_to_host(), False)


@dataclass
class Scene:
    host: PagedCache       # written by the reference (host arrays)
    table: np.ndarray      # [3, 4] int32: request r's blocks (unused columns 0, as vLLM leaves them)
    query: np.ndarray      # [T, H * GROUP, D] float32, T = 3 decode rows + 2 padding rows
    key: np.ndarray        # [T, H, D]
    seq: np.ndarray        # [3] int32, the new token included
    qsl: np.ndarray        # [4] int32


def _scene(seed: int = 0) -> Scene:
    rng = np.random.default_rng(seed)
    k_cfg, v_cfg = CodecConfig(D, 3.5, seed=seed + 1), CodecConfig(D, 2.5, seed=seed + 2)
    k_cache = np.zeros((NB, BS, H, k_cfg.record_bytes), np.uint8)
    v_cache = np.zeros((NB, BS, H, v_cfg.record_bytes), np.uint8)
    raw_map = np.full(NB, -1, np.int32)
    raw_map[[5, 2]] = [0, 2]  # blocks 5 and 2 have raw rows
    raw = rng.standard_normal((NUM_RAW, BS, H, D)).astype(np.float16)
    cache = PagedCache(k_cache, v_cache, k_cfg, v_cfg, raw_k=raw, raw_v=raw[::-1].copy(),
                       raw_slot_of_block=raw_map)
    table = np.array([[3, 5, 0, 0], [1, 6, 2, 0], [7, 0, 0, 0]], np.int32)
    for r, n in enumerate(CTX):
        pos = np.arange(n)
        kv = rng.standard_normal((2, n, H, D)).astype(np.float32)
        cache = tq.paged_write(cache, kv[0], kv[1], table[r, pos // BS] * BS + pos % BS)
    t = len(CTX) + 2
    return Scene(cache, table, rng.standard_normal((t, H * GROUP, D)).astype(np.float32),
                 rng.standard_normal((t, H, D)).astype(np.float32), np.array(CTX, np.int32) + 1,
                 np.arange(len(CTX) + 1, dtype=np.int32))


def _device_cache(lib: Lib, host: PagedCache) -> tuple[PagedCache, Any]:
    """The cache on the device; returns it and the array holding its records (to read back)."""
    if lib.packed:
        r_k = host.k_config.record_bytes
        packed = np.concatenate([host.k_cache, host.v_cache], axis=3).transpose(0, 2, 1, 3)
        store = lib.put(packed)
        k, v = store[..., :r_k].transpose(0, 2, 1, 3), store[..., r_k:].transpose(0, 2, 1, 3)
    else:
        k, v = lib.put(host.k_cache), lib.put(host.v_cache)
        store = (k, v)
    put = lib.put
    cache = PagedCache(k, v, host.k_config, host.v_config, put(host.k_channels), put(host.v_channels),
                       put(host.raw_k), put(host.raw_v), put(host.raw_slot_of_block))
    return cache, store


def _attend(lib: Lib, s: Scene, table: np.ndarray, seq: np.ndarray, qsl: np.ndarray | None = None,
            raw_map: np.ndarray | None = None, num_decodes: int | None = 3) -> np.ndarray:
    host = s.host if raw_map is None else PagedCache(
        s.host.k_cache, s.host.v_cache, s.host.k_config, s.host.v_config, s.host.k_channels,
        s.host.v_channels, s.host.raw_k, s.host.raw_v, raw_map)
    cache, _ = _device_cache(lib, host)
    out = lib.put(np.full(s.query.shape, SENTINEL, np.float32))
    tq.paged_attention(cache, lib.put(s.query), lib.put(s.key), lib.put(s.key), lib.put(table), lib.put(seq),
                       lib.put(s.qsl if qsl is None else qsl), scale=0.125, out=out, num_decodes=num_decodes,
                       backend=lib.name)
    return lib.get(out)


def _hostile(s: Scene, what: str) -> dict[str, np.ndarray]:
    table, seq, raw_map = s.table.copy(), s.seq.copy(), s.host.raw_slot_of_block.copy()
    kind, _, value = what.partition("=")
    v = int(value)
    if kind == "block":
        table[0, 1] = v  # request 0's second (used) block
    elif kind == "seq":
        seq[0] = v
    elif kind == "raw":
        raw_map[5] = v  # request 0's block 5
    return {"table": table, "seq": seq, "raw_map": raw_map}


HOSTILE = ["block=-1", "block=-3", f"block={NB}", f"block={I32_MAX}", f"block={I32_MIN}",
           f"seq={4 * BS + 100}", f"seq={I32_MAX}", "seq=-5", f"raw={NUM_RAW}", f"raw={I32_MAX}", "raw=-7",
           f"raw={I32_MIN}"]


@pytest.mark.parametrize("what", HOSTILE)
def test_hostile_decode_metadata_stays_in_its_request(lib: Lib, what: str) -> None:
    """Request 0 gets a hostile entry: the other requests' rows are bitwise those of a clean call,
    request 0's row is finite (or untouched), padding rows are untouched."""
    s = _scene()
    clean = _attend(lib, s, s.table, s.seq)
    bad = _hostile(s, what)
    got = _attend(lib, s, bad["table"], bad["seq"], raw_map=bad["raw_map"])
    np.testing.assert_array_equal(got[1:3], clean[1:3])
    assert np.all(got[3:] == SENTINEL)
    assert np.isfinite(got[0]).all()
    if what == "block=-3":
        # A wrapped index would have read block NB - 3 = 5 (another block of the cache) in its place.
        wrapped = s.table.copy()
        wrapped[0, 1] = NB - 3
        assert not np.array_equal(got[0], _attend(lib, s, wrapped, s.seq)[0])


def test_hostile_metadata_without_num_decodes_is_refused(lib: Lib) -> None:
    """Without ``num_decodes`` the backend synchronises anyway: the values are checked on the host."""
    s = _scene()
    cases = (("block=-3", r"block_table\[0, 1\] = -3"), (f"seq={4 * BS + 100}", "seq_lens need"))
    for what, message in cases:
        bad = _hostile(s, what)
        with pytest.raises(ValueError, match=message):
            _attend(lib, s, bad["table"], bad["seq"], num_decodes=None)


@pytest.mark.parametrize("qsl", [[0, 1, 2, 9], [0, 1, 2, -4], [0, 1, 2, 1], [0, 1, 2, I32_MAX]],
                         ids=["past-T", "negative", "decreasing", "huge"])
def test_hostile_query_start_loc_of_a_prefill_request(lib: Lib, qsl: list[int]) -> None:
    """Two decodes and a request past them (the generic path) whose rows the step does not hold:
    that request is left unwritten, the decodes are as in a clean call."""
    s = _scene()
    ok = np.array([0, 1, 2, 3], np.int32)
    clean = _attend(lib, s, s.table, s.seq, qsl=ok, num_decodes=2)
    got = _attend(lib, s, s.table, s.seq, qsl=np.array(qsl, np.int32), num_decodes=2)
    np.testing.assert_array_equal(got[:2], clean[:2])
    assert np.all(got[2:] == SENTINEL)


@pytest.mark.parametrize("slot", [NB * BS, 2**40, 2**63 - 1, -5, -(2**63)], ids=repr)
def test_hostile_slots_write_nothing_outside(lib: Lib, slot: int) -> None:
    """A write whose middle token has a hostile slot: the other two land where a clean write puts
    them, nothing else in the cache or the raw pool changes."""
    s = _scene()
    key = np.random.default_rng(5).standard_normal((3, H, D)).astype(np.float32)
    good = np.array([3 * BS + 4, -1, 2 * BS + 1], np.int64)  # block 3, padding, block 2 (raw row)
    hostile = good.copy()
    hostile[1] = slot
    results = []
    for slots in (good, hostile):
        cache, store = _device_cache(lib, s.host)
        tq.paged_write(cache, lib.put(key), lib.put(key), lib.put(slots), backend=lib.name)
        records = [lib.get(a) for a in (store if isinstance(store, tuple) else (store,))]
        results.append((records, lib.get(cache.raw_k), lib.get(cache.raw_v)))
    for a, b in zip(results[0][0] + list(results[0][1:]), results[1][0] + list(results[1][1:]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("channel", [D, 1023, 65535])
def test_channel_lists_out_of_range_stay_in_bounds(lib: Lib, channel: int) -> None:
    """GPU channel lists are not read on the host: an entry >= d is clamped by the kernels (encode's
    gather, decode's and attention's scatters, the query permutation): results finite, in bounds."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 40, D)).astype(np.float32)
    enc = tq.encode(x, bits=3.5, backend="numpy")
    channels = enc.channels.copy()
    channels[:, [0, D - 1]] = channel
    dev_x, dev_ch = lib.put(x), lib.put(channels)
    forged = tq.encode(dev_x, bits=3.5, channels=dev_ch, backend=lib.name, check_finite=False)
    assert np.isfinite(lib.get(tq.decode(forged, backend=lib.name))).all()
    records = tq.Encoded(lib.put(enc.records), dev_ch, enc.config)
    q = lib.put(rng.standard_normal((2 * GROUP, D)).astype(np.float32))  # 2 KV heads: the 2 streams
    out = tq.attention(q, records, records, scale=0.125, backend=lib.name, check_finite=False)
    assert np.isfinite(lib.get(out)).all()
    cache, _ = _device_cache(lib, _scene().host)
    bad = PagedCache(cache.k_cache, cache.v_cache, cache.k_config, cache.v_config,
                     lib.put(np.full((H, D), channel, np.uint16)), cache.v_channels, cache.raw_k, cache.raw_v,
                     cache.raw_slot_of_block)
    s = _scene()
    out = lib.put(np.full(s.query.shape, SENTINEL, np.float32))
    step = (lib.put(a) for a in (s.query, s.key, s.key, s.table, s.seq, s.qsl))
    tq.paged_attention(bad, *step, scale=0.125, out=out, num_decodes=3, backend=lib.name)
    got = lib.get(out)
    assert np.isfinite(got[:3]).all() and np.all(got[3:] == SENTINEL)
