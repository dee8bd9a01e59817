"""cupy_raw's paged ops (``backends/cupy_paged.py``, ``cuda/tq_paged.cu``) against the NumPy reference.

Caches are built on the host: a packed uint8 tensor ``[num_blocks, H, block_size, R_k + R_v]`` of
random bytes (stale slots hold garbage, NaN norms included) seen through vLLM's transposed views (or
two separate tensors for the unmerged layout), random block tables over a permutation of the blocks,
a raw pool on some blocks; the context is written by ``numpy_ref.paged_write``, which also picks the
channels. The GPU gets byte copies of the same arrays. Fresh random data in every test.

GPU tests skip where cupy_raw is unavailable; the nvcc compile test runs on CPU machines.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from turboquant_codec import tuning
from turboquant_codec.backends import availability as backend_availability
from turboquant_codec.backends import cupy_paged, cupy_raw, numpy_ref
from turboquant_codec.config import CodecConfig
from turboquant_codec.paged_cache import PagedCache
from turboquant_codec.tuning import CupyPagedTuning

from .conftest import kv_like

_STATUS = backend_availability("cupy_raw")
gpu = pytest.mark.skipif(not _STATUS, reason=f"cupy_raw unavailable: {_STATUS.reason}")


# ------------------------------------------------------------------------------------ host helpers
def _side_stream_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw partials on the forked stream whatever the batch, for the rest of the test (the settings
    in force are restored after it)."""
    paged = CupyPagedTuning(side_min_streams=1)
    monkeypatch.setattr(tuning, "_current", dataclasses.replace(tuning.current(), cupy_paged=paged))


def _bf16_words(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values representable in ``dtype``."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (_bf16_words(x).astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def _dev(x: np.ndarray, dtype: str) -> Any:
    """GPU array of ``dtype`` holding float32 host values (bfloat16 as cupy_raw's raw words)."""
    import cupy as cp

    if dtype == "bfloat16":
        return cupy_raw._Raw16(cp.asarray(_bf16_words(x)), "bfloat16")
    return cp.asarray(x.astype(dtype))


def _host(a: Any) -> np.ndarray:
    import cupy as cp

    if isinstance(a, cupy_raw._Raw16):
        return (cp.asnumpy(a.words).astype(np.uint32) << 16).view(np.float32)
    return cp.asnumpy(a).astype(np.float32)


def _poisoned(shape: tuple[int, ...], dtype: str) -> Any:
    import cupy as cp

    if dtype == "bfloat16":
        return cupy_raw._Raw16(cp.full(shape, 0x7FC0, cp.uint16), "bfloat16")
    return cp.full(shape, np.nan, dtype)


class Scene:
    """One layer's cache (host and GPU twins), a batch's metadata and its new tokens."""

    def __init__(self, rng: np.random.Generator, *, d: int, bits: float, mode: str, dtype: str, bs: int,
                 group: int, reqs: list[tuple[int, int]], h: int = 2, layout: str = "merged",
                 raw_share: float = 0.4, spare_blocks: int = 6, v_bits: float | None = None,
                 v_scale: float = 1.0) -> None:
        self.dtype, self.bs, self.h, self.d = dtype, bs, h, d
        self.k_cfg = CodecConfig(d, bits, mode, seed=11)
        self.v_cfg = CodecConfig(d, bits if v_bits is None else v_bits, mode, seed=12)
        rk, rv = self.k_cfg.record_bytes, self.v_cfg.record_bytes
        # Decodes first (vLLM's order); each request (context tokens, new tokens).
        self.reqs = sorted(reqs, key=lambda cq: cq[1] != 1)
        self.num_decodes = sum(1 for _, q in self.reqs if q == 1)
        per = [-(-(c + q) // bs) for c, q in self.reqs]
        nb = sum(per) + spare_blocks
        perm = rng.permutation(nb)
        width = max(per) + 2
        self.block_table = np.full((len(per), width), -1, np.int32)
        at = 0
        for r, p in enumerate(per):
            self.block_table[r, :p] = perm[at:at + p]
            at += p
        if layout == "merged":
            packed = rng.integers(0, 256, (nb, h, bs, rk + rv), dtype=np.uint8)
            self.host_bytes = [packed]
            k_cache, v_cache = packed[..., :rk].transpose(0, 2, 1, 3), packed[..., rk:].transpose(0, 2, 1, 3)
        else:  # two tensors [nb, H, bs, R], each seen as [nb, bs, H, R]
            kp = rng.integers(0, 256, (nb, h, bs, rk), dtype=np.uint8)
            vp = rng.integers(0, 256, (nb, h, bs, rv), dtype=np.uint8)
            self.host_bytes = [kp, vp]
            k_cache, v_cache = kp.transpose(0, 2, 1, 3), vp.transpose(0, 2, 1, 3)
        self.layout = layout
        raw = None
        if raw_share > 0:
            has = rng.random(nb) < raw_share
            has[rng.integers(nb)] = True
            rsb = np.full(nb, -1, np.int32)
            rsb[has] = rng.permutation(int(has.sum()))
            n_raw = int(has.sum()) + 1
            raw = (_rounded(rng.standard_normal((n_raw, bs, h, d)).astype(np.float32), dtype),
                   _rounded((rng.standard_normal((n_raw, bs, h, d)) * v_scale).astype(np.float32), dtype),
                   rsb)
        self.cache = PagedCache(k_cache, v_cache, self.k_cfg, self.v_cfg,
                                raw_k=None if raw is None else raw[0], raw_v=None if raw is None else raw[1],
                                raw_slot_of_block=None if raw is None else raw[2])
        # The context, written by the reference (which picks the channels).
        ctx_slots = [int(self.block_table[r, p // bs]) * bs + p % bs
                     for r, (c, _) in enumerate(self.reqs) for p in range(c)]
        if ctx_slots:
            n = len(ctx_slots)
            kc = _rounded(kv_like(rng, (n, h, d)), dtype)
            vc = _rounded((rng.standard_normal((n, h, d)) * v_scale).astype(np.float32), dtype)
            k_ch, v_ch = numpy_ref.paged_write(self.cache, kc, vc, np.asarray(ctx_slots, np.int64))
        else:
            k_ch = v_ch = None
            if self.k_cfg.split:
                k_ch = np.tile(np.arange(d, dtype=np.uint16), (h, 1))
                v_ch = k_ch.copy()
        self.cache = self.cache.with_channels(k_ch, v_ch)
        self.seq_lens = np.asarray([c + q for c, q in self.reqs], np.int32)
        self.qsl = np.concatenate([[0], np.cumsum([q for _, q in self.reqs])]).astype(np.int32)
        self.t = int(self.qsl[-1]) + 2  # two padding rows
        h_q = h * group
        self.query = _rounded(rng.standard_normal((self.t, h_q, d)).astype(np.float32), dtype)
        self.key = _rounded(kv_like(rng, (self.t, h, d)), dtype)
        self.value = _rounded((rng.standard_normal((self.t, h, d)) * v_scale).astype(np.float32), dtype)
        self.scale = d**-0.5

    def gpu_cache(self) -> PagedCache:
        import cupy as cp

        c = self.cache
        rk = self.k_cfg.record_bytes
        if self.layout == "merged":
            packed = cp.asarray(self.host_bytes[0])
            k, v = packed[..., :rk].transpose(0, 2, 1, 3), packed[..., rk:].transpose(0, 2, 1, 3)
        else:
            k, v = (cp.asarray(a).transpose(0, 2, 1, 3) for a in self.host_bytes)
        raw = {}
        if c.has_raw:
            raw = {"raw_k": _dev(c.raw_k, self.dtype), "raw_v": _dev(c.raw_v, self.dtype),
                   "raw_slot_of_block": cp.asarray(c.raw_slot_of_block)}
        ch = [None if x is None else cp.asarray(x) for x in (c.k_channels, c.v_channels)]
        return PagedCache(k, v, self.k_cfg, self.v_cfg, ch[0], ch[1], **raw)

    def reference(self) -> np.ndarray:
        out = np.zeros(self.query.shape, np.float32)
        numpy_ref.paged_attention(self.cache, self.query, self.key, self.value, self.block_table,
                                  self.seq_lens, self.qsl, self.scale, out, None)
        return out

    def run_gpu(self, cache: PagedCache | None = None, num_decodes: int | None = -1, block_table: Any = None,
                seq_lens: Any = None) -> Any:
        import cupy as cp

        out = _poisoned(self.query.shape, self.dtype)
        cupy_raw.paged_attention(
            cache or self.gpu_cache(), _dev(self.query, self.dtype), _dev(self.key, self.dtype),
            _dev(self.value, self.dtype),
            cp.asarray(self.block_table if block_table is None else block_table),
            cp.asarray(self.seq_lens if seq_lens is None else seq_lens), cp.asarray(self.qsl), self.scale,
            out,
            self.num_decodes if num_decodes == -1 else num_decodes)
        return out


_TOL = {"float32": 1e-4, "float16": 1.5e-3, "bfloat16": 1e-2}


def _check(scene: Scene, got: Any) -> None:
    want = _rounded(scene.reference(), scene.dtype)
    g = _host(got)
    n = int(scene.qsl[-1])
    tol = _TOL[scene.dtype]
    np.testing.assert_allclose(g[:n], want[:n], rtol=tol, atol=tol * float(np.abs(want[:n]).max()))
    assert np.isnan(g[n:]).all(), "padding rows were written"


def _requests(rng: np.random.Generator, decodes: int, prefills: int, most: int) -> list[tuple[int, int]]:
    reqs = [(int(rng.integers(0, most)), 1) for _ in range(decodes)]
    reqs += [(int(rng.integers(0, most // 2)), int(rng.integers(2, 24))) for _ in range(prefills)]
    return reqs


# ------------------------------------------------------------------------------------ GPU: attention
CASES = {
    # name: (bits, mode, d, dtype, block size, query heads per KV head, layout)
    "mse3.5-d128-bf16-b16-g4": (3.5, "mse", 128, "bfloat16", 16, 4, "merged"),
    "mse2.5-d128-f16-b16-g1": (2.5, "mse", 128, "float16", 16, 1, "merged"),
    "mse4-d64-f32-b32-g2-split": (4.0, "mse", 64, "float32", 32, 2, "split"),
    "prod3.5-d64-f16-b16-g8": (3.5, "prod", 64, "float16", 16, 8, "merged"),
    "prod2.5-d128-bf16-b16-g12": (2.5, "prod", 128, "bfloat16", 16, 12, "merged"),
    "mse3.5-d128-f16-b24-g4-generic": (3.5, "mse", 128, "float16", 24, 4, "merged"),
}


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES) + ["side-stream", "small-chunks"])
def test_paged_attention_matches_reference(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if case == "side-stream":  # raw partials on the forked stream, whatever the batch
        _side_stream_always(monkeypatch)
    if case == "small-chunks":  # other split and raw-part shapes than the defaults: 1024-token chunks
        paged = CupyPagedTuning(split_warps=8, tiles_per_warp=8, raw_scan=1, raw_u=2, side_row_threads=64)
        monkeypatch.setattr(tuning, "_current", dataclasses.replace(tuning.current(), cupy_paged=paged))
    bits, mode, d, dtype, bs, group, layout = CASES.get(case, CASES["mse3.5-d128-bf16-b16-g4"])
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    # empty, multi-chunk, and two raw parts (over cupy_paged.raw_part() blocks at block size 16)
    reqs = _requests(rng, 5, 2, 700) + [(0, 1), (16 * 4096 // 16 + 37, 1),
                                        (16 * cupy_paged.raw_part() + 300, 1)]
    scene = Scene(rng, d=d, bits=bits, mode=mode, dtype=dtype, bs=bs, group=group, reqs=reqs, layout=layout)
    assert (cupy_paged.fast_layout(scene.gpu_cache()) is None) == (bs % 16 != 0)
    _check(scene, scene.run_gpu())


@gpu
@pytest.mark.gpu
def test_num_decodes_found_from_query_start_loc() -> None:
    rng = np.random.default_rng()
    scene = Scene(rng, d=128, bits=3.5, mode="mse", dtype="bfloat16", bs=16, group=4,
                  reqs=_requests(rng, 4, 2, 400))
    _check(scene, scene.run_gpu(num_decodes=None))


@gpu
@pytest.mark.gpu
def test_decode_batch_invariant_bitwise() -> None:
    """A request's output is bitwise the same alone and in batches of other sizes and orders."""
    import cupy as cp

    rng = np.random.default_rng()
    # Request 0 spans two raw parts; the sub-batches' block tables are cut to their own widest
    # request, so chunk and raw-part counts (and the scratch strides) change with the batch.
    reqs = [(16 * cupy_paged.raw_part() + 300, 1)] + [(int(rng.integers(1, 9000)), 1) for _ in range(6)]
    scene = Scene(rng, d=128, bits=3.5, mode="mse", dtype="float32", bs=16, group=4, reqs=reqs)
    cache = scene.gpu_cache()
    assert cupy_paged.fast_layout(cache) is not None
    full = _host(scene.run_gpu(cache))
    _check(scene, cp.asarray(full))
    for rows in ([3], [5, 3], [6, 0, 3, 1]):
        sub = Scene.__new__(Scene)
        sub.__dict__.update(scene.__dict__)
        width = int(max(-(-scene.seq_lens[rows] // 16))) + 1
        sub.block_table = np.ascontiguousarray(scene.block_table[rows][:, :width])
        sub.seq_lens = scene.seq_lens[rows]
        sub.qsl = np.arange(len(rows) + 1, dtype=np.int32)
        sub.num_decodes = len(rows)
        sub.query, sub.key, sub.value = (a[rows] for a in (scene.query, scene.key, scene.value))
        got = _host(sub.run_gpu(cache))
        assert np.array_equal(got[: len(rows)], full[rows]), rows


@gpu
@pytest.mark.gpu
def test_hostile_metadata_stays_inside_the_cache() -> None:
    """Block ids out of range, seq_lens past the table, raw rows past the pool: no fault, nothing
    written outside ``out``'s request rows, the cache bytes unchanged."""
    import cupy as cp

    rng = np.random.default_rng()
    scene = Scene(rng, d=128, bits=3.5, mode="mse", dtype="bfloat16", bs=16, group=4,
                  reqs=[(300, 1), (40, 1), (900, 1)])
    cache = scene.gpu_cache()
    cache = PagedCache(cache.k_cache, cache.v_cache, cache.k_config, cache.v_config, cache.k_channels,
                       cache.v_channels, cache.raw_k, cache.raw_v,
                       cp.asarray(np.where(scene.cache.raw_slot_of_block >= 0, 10**6,
                                           scene.cache.raw_slot_of_block).astype(np.int32)))
    assert cupy_paged.fast_layout(cache) is not None
    before = cp.asnumpy(cache.k_cache.base if cache.k_cache.base is not None else cache.k_cache).copy()
    table = scene.block_table.copy()
    table[0, ::3] = -7
    table[1, :] = 2**31 - 1
    seq = scene.seq_lens.copy()
    seq[2] = 10**8
    out = scene.run_gpu(cache, block_table=table, seq_lens=seq)
    cp.cuda.runtime.deviceSynchronize()
    after = cp.asnumpy(cache.k_cache.base if cache.k_cache.base is not None else cache.k_cache)
    assert np.array_equal(before, after)
    assert np.isnan(_host(out)[3:]).all()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mse3.5-d128-bf16-b16-g4", "mse3.5-d128-f16-b24-g4-generic", "side-stream"])
def test_raw_slot_past_the_pool_reads_the_records(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PagedCache's rule: a raw_slot_of_block entry past the raw pool is no raw row; the fused
    split, its raw partials and the generic path all read such a block from its records, as the
    reference does."""
    if case == "side-stream":
        _side_stream_always(monkeypatch)
    bits, mode, d, dtype, bs, group, layout = CASES.get(case, CASES["mse3.5-d128-bf16-b16-g4"])
    rng = np.random.default_rng()
    scene = Scene(rng, d=d, bits=bits, mode=mode, dtype=dtype, bs=bs, group=group, layout=layout,
                  reqs=_requests(rng, 5, 2, 700) + [(900, 1)], raw_share=0.6)
    rsb = scene.cache.raw_slot_of_block.copy()
    mapped = np.flatnonzero(rsb >= 0)
    num_raw = scene.cache.raw_k.shape[0]
    rsb[mapped[::2]] = num_raw + np.arange(len(mapped[::2]))  # half the raw rows: past the pool
    scene.cache = PagedCache(**{**vars(scene.cache), "raw_slot_of_block": rsb})
    assert (cupy_paged.fast_layout(scene.gpu_cache()) is None) == (bs % 16 != 0)
    _check(scene, scene.run_gpu())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mse3.5-d128-bf16-b16-g4", "prod2.5-d128-bf16-b16-g12",
                                  "mse4-d64-f32-b32-g2-split"])
def test_paged_attention_with_value_norms_past_float16(case: str) -> None:
    """Value norms of ~1e6 (past float16's 65504, where the split's P' = p * value norm takes its
    range factor) in the records, the raw rows and the new tokens: as the reference, finite."""
    bits, mode, d, dtype, bs, group, layout = CASES[case]
    rng = np.random.default_rng()
    scene = Scene(rng, d=d, bits=bits, mode=mode, dtype=dtype, bs=bs, group=group, layout=layout,
                  reqs=_requests(rng, 5, 2, 700) + [(9000, 1)], v_scale=1e6 / np.sqrt(d))
    got = scene.run_gpu()
    assert np.isfinite(_host(got)[: int(scene.qsl[-1])]).all()
    _check(scene, got)


# ------------------------------------------------------------------------------------ GPU: write
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(3.5, "mse", 128, "bfloat16", "merged"),
                                 (2.5, "prod", 64, "float32", "split"),
                                 (4.0, "mse", 128, "float16", "merged")])
@pytest.mark.parametrize("pick_channels", [False, True])
def test_paged_write_matches_reference(cfg: tuple, pick_channels: bool) -> None:
    import cupy as cp

    bits, mode, d, dtype, layout = cfg
    rng = np.random.default_rng()
    scene = Scene(rng, d=d, bits=bits, mode=mode, dtype=dtype, bs=16, group=1, reqs=[(50, 1), (3, 1)],
                  layout=layout, spare_blocks=4)
    cache_h = scene.cache if not pick_channels else scene.cache.with_channels(None, None)
    cache_g = scene.gpu_cache()
    if pick_channels:
        cache_g = cache_g.with_channels(None, None)
    t = 24
    key = _rounded(kv_like(rng, (t, scene.h, d)), dtype)
    value = _rounded(rng.standard_normal((t, scene.h, d)).astype(np.float32), dtype)
    nb = cache_h.num_blocks
    # Slot 1 lands in a block with a raw row; every fifth token is padding; rows past
    # len(slot_mapping) are ignored.
    raw_slot = int(np.flatnonzero(cache_h.raw_slot_of_block >= 0)[0]) * 16 + 5
    slots = rng.choice(np.setdiff1d(np.arange(nb * 16), [raw_slot]), t - 3, replace=False).astype(np.int64)
    slots[1] = raw_slot
    slots[::5] = -1
    raw_before = None if not cache_h.has_raw else cache_h.raw_k.copy()
    want = numpy_ref.paged_write(cache_h, key, value, slots)
    got = cupy_raw.paged_write(cache_g, _dev(key, dtype), _dev(value, dtype), cp.asarray(slots))
    for w, g in zip(want, got, strict=True):
        assert (w is None) == (g is None)
        if w is not None:
            assert np.array_equal(w, cp.asnumpy(g))
    kg, vg = cp.asnumpy(cache_g.k_cache), cp.asnumpy(cache_g.v_cache)
    written = np.zeros((nb, 16), bool)
    valid = slots[slots >= 0]
    written[valid // 16, valid % 16] = True
    for g, h in ((kg, np.asarray(cache_h.k_cache)), (vg, np.asarray(cache_h.v_cache))):
        assert np.array_equal(g[~written], h[~written])  # untouched slots, padding included
        # Written records: codes may differ from the float64 reference on boundary values only.
        assert np.mean(g[written] != h[written]) <= 2e-3
    if cache_h.has_raw:
        assert raw_before is not None and not np.array_equal(raw_before, cache_h.raw_k)
        np.testing.assert_array_equal(_host(cache_g.raw_k), cache_h.raw_k)
        np.testing.assert_array_equal(_host(cache_g.raw_v), cache_h.raw_v)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(3.5, 3.5, 128, "bfloat16", "merged", 1),
                                 (3.5, 3.5, 128, "bfloat16", "merged", 24),
                                 (4.0, 2.5, 64, "float16", "split", 40),
                                 (3.5, 3.5, 128, "float32", "split", 300)])
def test_paged_write_in_place_equals_staged(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """tq_write_tc (new tokens read in place, records and raw rows scattered by the encode itself;
    one launch for K and V of one build, two for K and V of different bits) writes the same bytes
    as the staged path (transposing copies, tq_encode_tc into scratch, scatter kernel), for decode
    (1 token) and prefill token counts, padding slots and raw rows included."""
    import cupy as cp

    k_bits, v_bits, d, dtype, layout, t = cfg
    rng = np.random.default_rng()
    scene = Scene(rng, d=d, bits=k_bits, v_bits=v_bits, mode="mse", dtype=dtype, bs=16, group=1,
                  reqs=[(50, 1), (3, 1)], layout=layout, spare_blocks=max(4, t // 16 + 4), h=3)
    nb = scene.cache.num_blocks
    key = _rounded(kv_like(rng, (t, scene.h, d)), dtype)
    value = _rounded(rng.standard_normal((t, scene.h, d)).astype(np.float32), dtype)
    raw_slot = int(np.flatnonzero(scene.cache.raw_slot_of_block >= 0)[0]) * 16 + 3
    slots = rng.choice(np.setdiff1d(np.arange(nb * 16), [raw_slot]), t, replace=False).astype(np.int64)
    slots[0] = raw_slot
    if t > 1:
        slots[1::5] = -1
    caches, launched = [], []
    real = cupy_paged._write_tc
    for in_place in (True, False):
        cache = scene.gpu_cache()

        def spy(*args: Any, in_place: bool = in_place) -> bool:
            launched.append(in_place and real(*args))
            return launched[-1]

        monkeypatch.setattr(cupy_paged, "_write_tc", spy)
        cupy_raw.paged_write(cache, _dev(key, dtype), _dev(value, dtype), cp.asarray(slots))
        caches.append(cache)
    assert launched == [True, False]
    new, old = caches
    for a, b in ((new.k_cache, old.k_cache), (new.v_cache, old.v_cache), (new.raw_k, old.raw_k),
                 (new.raw_v, old.raw_v)):
        a, b = (x.words if isinstance(x, cupy_raw._Raw16) else x for x in (a, b))
        assert np.array_equal(cp.asnumpy(a), cp.asnumpy(b))
    before = scene.gpu_cache()
    assert not np.array_equal(cp.asnumpy(new.k_cache), cp.asnumpy(before.k_cache))  # something was written


# ------------------------------------------------------------------------------------ GPU: CUDA graph
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("side", [False, True])
def test_decode_step_graph_capture_equals_eager(side: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """32 layers of (paged_write, paged_attention) through the public API on torch tensors, captured
    in one torch CUDA graph; replays equal eager calls bitwise, also after new inputs are copied in."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import turboquant_codec as tq
    from turboquant_codec import _replay
    from turboquant_codec import paged as public_paged

    if side:  # raw partials on the forked stream: the capture follows the fork and the join
        _side_stream_always(monkeypatch)
    # No replay of the other case's launches (the allocator may hand this case the same addresses).
    monkeypatch.setattr(public_paged, "_REPLAYS", _replay.Memo())
    rng = np.random.default_rng()
    dev = torch.device("cuda")
    layers, b, h, group, d, bs = 32, 4, 2, 4, 128, 16
    k_cfg, v_cfg = CodecConfig(d, 3.5, seed=1), CodecConfig(d, 3.5, seed=2)
    rk, rv = k_cfg.record_bytes, v_cfg.record_bytes
    ctx = rng.integers(20, 600, b)
    per = -(-(ctx + 1) // bs)
    nb = int(per.sum()) + 4
    table = np.full((b, int(per.max())), 0, np.int32)
    perm = rng.permutation(nb)
    at = 0
    for r in range(b):
        table[r, :per[r]] = perm[at:at + per[r]]
        at += per[r]
    rsb = np.where(rng.random(nb) < 0.3, 0, -1).astype(np.int32)
    rsb[rsb >= 0] = np.arange(int((rsb >= 0).sum()))
    caches = []
    for _ in range(layers):
        packed = torch.randint(0, 256, (nb, h, bs, rk + rv), dtype=torch.uint8, device=dev)
        n_raw = int((rsb >= 0).sum()) + 1
        cache = PagedCache(packed[..., :rk].transpose(1, 2), packed[..., rk:].transpose(1, 2), k_cfg, v_cfg,
                           raw_k=torch.randn(n_raw, bs, h, d, device=dev, dtype=torch.bfloat16),
                           raw_v=torch.randn(n_raw, bs, h, d, device=dev, dtype=torch.bfloat16),
                           raw_slot_of_block=torch.as_tensor(rsb, device=dev))
        # Context written eagerly (this also picks the channels).
        pos = np.concatenate([np.arange(c) for c in ctx])
        req = np.repeat(np.arange(b), ctx)
        slots = torch.as_tensor(table[req, pos // bs].astype(np.int64) * bs + pos % bs, device=dev)
        kx = torch.as_tensor(kv_like(rng, (len(pos), h, d)), device=dev).bfloat16()
        vx = torch.randn(len(pos), h, d, device=dev, dtype=torch.bfloat16)
        caches.append(tq.paged_write(cache, kx, vx, slots, backend="cupy_raw"))
    bt = torch.as_tensor(table, device=dev)
    seq = torch.as_tensor(ctx + 1, dtype=torch.int32, device=dev)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
    slot_new = torch.as_tensor(table[np.arange(b), ctx // bs].astype(np.int64) * bs + ctx % bs, device=dev)
    q = torch.randn(layers, b, h * group, d, device=dev, dtype=torch.bfloat16)
    kn = torch.randn(layers, b, h, d, device=dev, dtype=torch.bfloat16)
    vn = torch.randn(layers, b, h, d, device=dev, dtype=torch.bfloat16)
    out = torch.zeros(layers, b, h * group, d, device=dev, dtype=torch.bfloat16)

    def step() -> None:
        for i, c in enumerate(caches):
            tq.paged_write(c, kn[i], vn[i], slot_new, backend="cupy_raw")
            tq.paged_attention(c, q[i], kn[i], vn[i], bt, seq, qsl, scale=d**-0.5, out=out[i], num_decodes=b,
                               backend="cupy_raw")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: kernels built, scratch allocated
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    step()
    torch.cuda.synchronize()
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    for t in (q, kn, vn):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    step()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out)
    assert not torch.equal(replayed, eager)



# ------------------------------------------------------------------------------------ GPU: public replays
@gpu
@pytest.mark.gpu
def test_public_decode_replay_follows_new_contents(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated all-decode ``tq.paged_attention`` call on the same GPU arrays replays the prepared
    launches (the backend is not called again) and reads the arrays' new contents: new queries and
    new tokens, and a block table and seq_lens permuted in place; a call on another ``out`` goes
    through the backend again."""
    import cupy as cp

    import turboquant_codec as tq
    from turboquant_codec import paged as public_paged

    rng = np.random.default_rng()
    reqs = [(int(rng.integers(1, 3000)), 1) for _ in range(6)]
    scene = Scene(rng, d=128, bits=3.5, mode="mse", dtype="float16", bs=16, group=4, reqs=reqs)
    cache = scene.gpu_cache()
    arrays = [cp.asarray(a) for a in (scene.query.astype(np.float16), scene.key.astype(np.float16),
                                      scene.value.astype(np.float16), scene.block_table, scene.seq_lens,
                                      scene.qsl)]
    out = cp.full(scene.query.shape, np.nan, cp.float16)
    n = scene.num_decodes

    def call(o: Any) -> Any:
        return tq.paged_attention(cache, *arrays, scale=scene.scale, out=o, num_decodes=n, backend="cupy_raw")

    _check(scene, call(out))
    assert len(public_paged._REPLAYS) > 0

    def backend_called(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the backend ran: no replay")

    monkeypatch.setattr(cupy_raw, "paged_attention", backend_called)
    perm = rng.permutation(len(reqs))
    scene.reqs = [scene.reqs[i] for i in perm]
    scene.block_table, scene.seq_lens = scene.block_table[perm], scene.seq_lens[perm]
    for name in ("query", "key", "value"):
        fresh = _rounded(rng.standard_normal(getattr(scene, name).shape).astype(np.float32), "float16")
        setattr(scene, name, fresh)
    for dst, src in zip(arrays, (scene.query, scene.key, scene.value, scene.block_table, scene.seq_lens),
                        strict=False):
        dst[...] = cp.asarray(src.astype(dst.dtype))
    out.fill(np.nan)
    _check(scene, call(out))
    with pytest.raises(AssertionError, match="no replay"):
        call(cp.full(scene.query.shape, np.nan, cp.float16))
