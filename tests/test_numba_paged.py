"""numba_cuda's paged ops (``backends/numba_paged.py``) against the NumPy reference.

Every test builds a fresh random scene: a packed K+V cache (the K and V caches are strided views of
it, as vLLM hands them over) filled with random bytes, a raw side pool holding some blocks, a random
block table, a history of context tokens written by the reference, and one step mixing two decode
requests with a chunked prefill, plus padding rows. Under Numba's CUDA simulator (CI) the shapes are
tiny (d = 32 or 64, 2 KV heads, GQA groups of 2, blocks of 4 tokens); on a GPU the same tests run
through torch CUDA tensors, plus one realistic shape. The kernels' PTX for sm_90 is built without a
GPU in a subprocess, since the simulator never types them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from turboquant_codec import _interop
from turboquant_codec import backends as registry
from turboquant_codec.backends import numpy_ref
from turboquant_codec.config import CodecConfig
from turboquant_codec.paged_cache import PagedCache
from turboquant_codec.testing import NORM_RTOL

from .conftest import kv_like

NAME = "numba_cuda"
BF16 = np.dtype(ml_dtypes.bfloat16)
# Boundary ties are the only allowed code disagreement between float32 and float64 encoders.
MAX_CODE_MISMATCH = 1e-3
# Attention in float32 against float64 (see tests/test_numba_cuda.py's ATTN_RTOL), plus one unit in
# the last place of the output dtype: both sides round nearly equal values, which may straddle a
# rounding boundary. Relative to the largest output of the request rows.
ATTN_RTOL = 1e-4
OUT_ULP = {np.dtype(np.float32): 0.0, np.dtype(np.float16): 2.0**-10, BF16: 2.0**-7}
# Padding rows of ``out`` hold this before the call and must still hold it after.
SENTINEL = 7.0


def _status() -> tuple[bool, bool]:
    """(available, simulated)."""
    if not registry.availability(NAME):
        return False, False
    from numba import config

    return True, bool(config.ENABLE_CUDASIM)


AVAILABLE, SIMULATED = _status()
needs_backend = pytest.mark.skipif(not AVAILABLE, reason=f"{NAME}: {registry.availability(NAME).reason}")
needs_gpu = pytest.mark.skipif(not AVAILABLE or SIMULATED, reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------ device arrays
def _put(x: np.ndarray) -> Any:
    """A device copy: Numba's simulator arrays (bfloat16 as uint16 bits), else a torch CUDA tensor
    (uint16 channel tables as int32: torch exports no uint16 CUDA array interface)."""
    x = np.ascontiguousarray(x)
    if SIMULATED:
        from numba import cuda

        return cuda.to_device(x.view(np.uint16) if x.dtype == BF16 else x)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16)).to("cuda").view(torch.bfloat16)
    if x.dtype == np.uint16:
        x = x.astype(np.int32)
    return torch.from_numpy(x).to("cuda")


def _get(x: Any, dtype: Any) -> np.ndarray:
    """Host copy of a device array, as ``dtype`` (bfloat16 from its uint16 bits in the simulator)."""
    host = _interop.to_numpy(x)
    if np.dtype(dtype) == BF16 and host.dtype == np.uint16:
        return host.view(BF16)
    return host.astype(dtype, copy=False)


def _kv_views(packed: Any, r_k: int) -> tuple[Any, Any]:
    """K and V caches [num_blocks, block_size, H, R] as strided views of a packed [num_blocks, H,
    block_size, R_k + R_v] array (host NumPy, simulator or torch)."""
    if isinstance(packed, np.ndarray) or SIMULATED:
        return packed[..., :r_k].transpose((0, 2, 1, 3)), packed[..., r_k:].transpose((0, 2, 1, 3))
    return packed[..., :r_k].transpose(1, 2), packed[..., r_k:].transpose(1, 2)


# ------------------------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """A cache state on the host and the next step's inputs (module docstring)."""

    packed: np.ndarray            # [num_blocks, H, block_size, R_k + R_v] uint8
    raw_k: np.ndarray             # [num_raw, block_size, H, d]
    raw_v: np.ndarray
    raw_slot_of_block: np.ndarray  # [num_blocks] int32
    k_config: CodecConfig
    v_config: CodecConfig
    k_channels: np.ndarray | None
    v_channels: np.ndarray | None
    key: np.ndarray               # [T, H, d], the step's new tokens (T includes padding rows)
    value: np.ndarray
    query: np.ndarray             # [T, h_q, d]
    slot_mapping: np.ndarray      # [<= T] int64, -1 = padding
    block_table: np.ndarray       # [B, max_blocks] int32
    seq_lens: np.ndarray          # [B] int32
    query_start_loc: np.ndarray   # [B + 1] int32

    def host_cache(self) -> PagedCache:
        k, v = _kv_views(self.packed, self.k_config.record_bytes)
        return PagedCache(k, v, self.k_config, self.v_config, self.k_channels, self.v_channels,
                          self.raw_k, self.raw_v, self.raw_slot_of_block)

    def device_cache(self) -> tuple[PagedCache, Any, Any, Any]:
        """(cache over device copies, packed, raw_k, raw_v device arrays)."""
        packed, raw_k, raw_v = _put(self.packed), _put(self.raw_k), _put(self.raw_v)
        k, v = _kv_views(packed, self.k_config.record_bytes)
        channels = [None if c is None else _put(c) for c in (self.k_channels, self.v_channels)]
        cache = PagedCache(k, v, self.k_config, self.v_config, channels[0], channels[1], raw_k, raw_v,
                           _put(self.raw_slot_of_block))
        return cache, packed, raw_k, raw_v


def _scene(seed: int, d: int, k_spec: tuple[float, str], v_spec: tuple[float, str], dtype: Any,
           ctx_lens: tuple[int, ...] = (9, 5, 3), q_lens: tuple[int, ...] = (1, 1, 4),
           kv_heads: int = 2, groups: int = 2, block_size: int = 4, padding: int = 2,
           history: bool = True, raw_dtypes: tuple[Any, Any] | None = None) -> Scene:
    """Random scene: requests with ``ctx_lens`` cached tokens and ``q_lens`` new ones (decodes
    first), physical blocks shuffled, raw rows on some blocks; raw pools in ``dtype`` unless
    ``raw_dtypes`` (K, V) says otherwise."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    k_cfg = CodecConfig(d, k_spec[0], k_spec[1], seed)
    v_cfg = CodecConfig(d, v_spec[0], v_spec[1], seed + 1)
    seq = np.array(ctx_lens) + np.array(q_lens)
    per_req = -(-seq // block_size)
    num_blocks = int(per_req.sum()) + 3  # a few blocks no request uses
    max_blocks = int(per_req.max()) + 1
    physical = rng.permutation(num_blocks)
    table = np.full((len(seq), max_blocks), -1, np.int32)
    at = 0
    for r, n in enumerate(per_req):
        table[r, :n] = physical[at : at + n]
        at += n
    # Raw rows as serving grants them: each request's last block (the recent window) and the first
    # request's first block (a sink); the other blocks are read from their records.
    has_blocks = np.flatnonzero(per_req)
    raw_blocks = np.unique(np.concatenate([table[has_blocks, per_req[has_blocks] - 1], table[:1, 0]]))
    raw_slot = np.full(num_blocks, -1, np.int32)
    raw_slot[raw_blocks] = rng.permutation(len(raw_blocks))
    num_raw = len(raw_blocks) + 1  # one raw row no block uses
    r_total = k_cfg.record_bytes + v_cfg.record_bytes
    packed = rng.integers(0, 256, (num_blocks, kv_heads, block_size, r_total), dtype=np.uint8)
    rk_dtype, rv_dtype = raw_dtypes or (dtype, dtype)
    raw_k = kv_like(rng, (num_raw, block_size, kv_heads, d)).astype(rk_dtype)
    raw_v = kv_like(rng, (num_raw, block_size, kv_heads, d)).astype(rv_dtype)

    def slots(r: int, positions: np.ndarray) -> np.ndarray:
        return table[r, positions // block_size].astype(np.int64) * block_size + positions % block_size

    scene = Scene(packed, raw_k, raw_v, raw_slot, k_cfg, v_cfg, None, None,
                  key=np.empty(0), value=np.empty(0), query=np.empty(0), slot_mapping=np.empty(0),
                  block_table=table, seq_lens=seq.astype(np.int32),
                  query_start_loc=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    if history:  # the context, written by the reference (channels chosen from it)
        hist_slots = np.concatenate([slots(r, np.arange(c)) for r, c in enumerate(ctx_lens)])
        hk = kv_like(rng, (len(hist_slots), kv_heads, d)).astype(dtype)
        hv = kv_like(rng, (len(hist_slots), kv_heads, d)).astype(dtype)
        scene.k_channels, scene.v_channels = numpy_ref.paged_write(scene.host_cache(), hk, hv, hist_slots)
    n_new = int(sum(q_lens))
    tokens = n_new + padding
    new_slots = np.concatenate([slots(r, c + np.arange(q))
                                for r, (c, q) in enumerate(zip(ctx_lens, q_lens, strict=True))])
    # slot_mapping may be shorter than the token rows (CUDA-graph padding); one padding slot is in it.
    scene.slot_mapping = np.concatenate([new_slots, [-1] * (padding - 1)]).astype(np.int64)
    scene.key = kv_like(rng, (tokens, kv_heads, d)).astype(dtype)
    scene.value = kv_like(rng, (tokens, kv_heads, d)).astype(dtype)
    scene.query = kv_like(rng, (tokens, kv_heads * groups, d)).astype(dtype)
    return scene


def _written(scene: Scene) -> np.ndarray:
    """[num_blocks, H, block_size] bool: the (block, head, offset) states the step writes."""
    nb, heads, bs, _ = scene.packed.shape
    mask = np.zeros((nb, heads, bs), bool)
    for s in scene.slot_mapping[scene.slot_mapping >= 0]:
        mask[s // bs, :, s % bs] = True
    return mask


def _records_match(got: np.ndarray, want: np.ndarray, cfg: CodecConfig) -> None:
    """Codes, norms and signs of records [..., R] agree up to float32-versus-float64 encoding."""
    assert got.shape == want.shape
    for g in cfg.groups:
        codes = numpy_ref._codes(got, g) != numpy_ref._codes(want, g)
        assert np.mean(codes) <= MAX_CODE_MISMATCH
        for which in range(2 if g.qjl else 1):
            np.testing.assert_allclose(numpy_ref._norms(got, g, which), numpy_ref._norms(want, g, which),
                                       rtol=NORM_RTOL)
        if g.qjl:
            assert np.mean(numpy_ref._signs(got, g) != numpy_ref._signs(want, g)) <= MAX_CODE_MISMATCH


# Secondary tests: one KV head (still GQA: 2 query heads), a decode and a chunked prefill, so the
# simulator runs 2 attention blocks instead of 6.
SMALL = {"ctx_lens": (9, 3), "q_lens": (1, 3), "kv_heads": 1}

# The main matrix: 2 KV heads; the first configuration with two decodes and a chunked prefill (6
# attention blocks in the simulator), the others with one decode, the prefill and an empty request
# (no tokens, no blocks: a CUDA-graph batch's padding request; its blocks return at once).
PAIR = {"ctx_lens": (9, 3, 0), "q_lens": (1, 4, 0)}
CONFIGS = [
    pytest.param(32, (3.5, "mse"), (3.0, "prod"), np.float32, {}, id="d32-k3.5mse-v3prod-f32"),
    pytest.param(64, (3.0, "prod"), (3.5, "mse"), np.float16, PAIR, id="d64-k3prod-v3.5mse-f16"),
    pytest.param(32, (3.5, "mse"), (3.5, "mse"), BF16, PAIR, id="d32-3.5mse-bf16"),
]


# ---------------------------------------------------------------------------------------- paged_write
def _check_write(scene: Scene) -> None:
    before = scene.packed.copy()
    raw_before = (scene.raw_k.copy(), scene.raw_v.copy())
    cache, packed, raw_k, raw_v = scene.device_cache()
    args = (scene.key, scene.value, scene.slot_mapping)
    got_ch = registry.load(NAME).paged_write(cache, *(_put(a) for a in args))
    want_ch = numpy_ref.paged_write(scene.host_cache(), *args)

    for got, want in zip(got_ch, want_ch, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(_get(got, np.int64), want.astype(np.int64))
    got_packed = _get(packed, np.uint8)
    mask = _written(scene)
    assert mask.any()
    # Every state the step does not write is untouched (random bytes or the history's records).
    np.testing.assert_array_equal(got_packed[~mask], before[~mask])
    r_k = scene.k_config.record_bytes
    _records_match(got_packed[mask][:, :r_k], scene.packed[mask][:, :r_k], scene.k_config)
    _records_match(got_packed[mask][:, r_k:], scene.packed[mask][:, r_k:], scene.v_config)
    # Raw copies: the same conversion on both sides, so equal bits; other rows untouched.
    for dev, want, old in ((raw_k, scene.raw_k, raw_before[0]), (raw_v, scene.raw_v, raw_before[1])):
        got = _get(dev, want.dtype)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
        assert not np.array_equal(want.view(np.uint8), old.view(np.uint8))  # the step wrote some


@needs_backend
@pytest.mark.parametrize("d,k_spec,v_spec,dtype,batch", CONFIGS)
def test_paged_write_matches_reference(d: int, k_spec: tuple[float, str], v_spec: tuple[float, str],
                                       dtype: Any, batch: dict[str, Any]) -> None:
    """Channels already fixed by the history: records, raw copies, untouched states."""
    _check_write(_scene(1, d, k_spec, v_spec, dtype, **batch))


@needs_backend
def test_paged_write_chooses_channels_from_non_padding_tokens() -> None:
    """First write into an empty cache: the permutations come from the non-padding rows only, so
    padding rows with huge values must not move them."""
    scene = _scene(2, 32, (3.5, "mse"), (2.5, "prod"), np.float16, history=False, **SMALL)
    pad = scene.slot_mapping < 0
    scene.key[np.flatnonzero(pad)] = 1000.0
    scene.key[len(scene.slot_mapping) :] = 1000.0
    _check_write(scene)


@needs_backend
def test_paged_write_ignores_padding_rows() -> None:
    """Padding rows (stale or uninitialised in serving) are never encoded: norms past the float16
    range there must not raise the encoder's overflow error."""
    scene = _scene(8, 32, (3.0, "prod"), (3.5, "mse"), np.float32, **SMALL)
    scene.key[np.flatnonzero(scene.slot_mapping < 0)] = 1e6
    scene.value[len(scene.slot_mapping) :] = -1e6
    _check_write(scene)


@needs_backend
def test_raw_pools_of_another_dtype() -> None:
    """float32 tokens into a bfloat16 K pool and a float16 V pool: rounded to nearest even as NumPy
    (ml_dtypes) rounds them, ties, subnormals and signed zeros included; then attention reads them."""
    scene = _scene(9, 32, (3.5, "mse"), (3.0, "prod"), np.float32, raw_dtypes=(BF16, np.float16),
                   **SMALL)
    one = 1.0 + 2.0**-8  # a bfloat16 tie: to even (1.0); 1 + 3 * 2**-8 goes up
    special = np.array([one, 1.0 + 3 * 2.0**-8, -one, 2.0**-130, 1.5 * 2.0**-133, 0.0, -0.0, 255.5,
                        1.0 + 2.0**-11, 2.0**-20], np.float32)
    last = int(scene.slot_mapping[scene.slot_mapping >= 0].size) - 1  # the prefill's last token
    scene.key[last, :, : special.size] = special
    scene.value[last, :, : special.size] = special
    _check_write(scene)
    _check_attention(_numba(scene), _reference(scene), scene)


@needs_backend
def test_paged_write_skips_slots_past_the_cache() -> None:
    """A slot past the last block (a hostile id) writes nothing and reads nothing out of range."""
    scene = _scene(3, 32, (3.5, "mse"), (3.0, "prod"), np.float32, **SMALL)
    nb, _, bs, _ = scene.packed.shape
    scene.slot_mapping[1] = nb * bs + 5
    _check_write(replace(scene, slot_mapping=scene.slot_mapping[scene.slot_mapping < nb * bs]))


# ------------------------------------------------------------------------------------ paged_attention
def _reference(scene: Scene) -> np.ndarray:
    """The reference's out [T, h_q, d] in the query dtype, padding rows pre-filled with SENTINEL."""
    out = np.full(scene.query.shape, SENTINEL, scene.query.dtype)
    return numpy_ref.paged_attention(scene.host_cache(), scene.query, scene.key, scene.value,
                                     scene.block_table, scene.seq_lens, scene.query_start_loc,
                                     scene.k_config.d**-0.5, out, None)


def _numba(scene: Scene) -> np.ndarray:
    """numba_cuda's out for the same inputs, on device copies of the scene."""
    cache, *_ = scene.device_cache()
    out = _put(np.full(scene.query.shape, SENTINEL, scene.query.dtype))
    meta = (scene.block_table, scene.seq_lens, scene.query_start_loc)
    decodes = int(np.sum(np.diff(scene.query_start_loc) == 1))
    got = registry.load(NAME).paged_attention(cache, _put(scene.query), _put(scene.key), _put(scene.value),
                                              *(_put(m) for m in meta), scene.k_config.d**-0.5, out, decodes)
    assert got is out
    return _get(out, scene.query.dtype)


def _check_attention(got: np.ndarray, want: np.ndarray, scene: Scene, first: int = 0) -> None:
    """Request rows from ``first`` on within the bound; padding rows still SENTINEL."""
    rows = int(scene.query_start_loc[-1])
    scale = float(np.abs(want[:rows].astype(np.float64)).max())
    tol = (ATTN_RTOL + OUT_ULP[scene.query.dtype]) * scale
    np.testing.assert_allclose(got[first:rows].astype(np.float64), want[first:rows].astype(np.float64),
                               rtol=0, atol=tol)
    np.testing.assert_array_equal(got[rows:].astype(np.float64), SENTINEL)


@needs_backend
@pytest.mark.parametrize("d,k_spec,v_spec,dtype,batch", CONFIGS)
def test_paged_attention_matches_reference(d: int, k_spec: tuple[float, str], v_spec: tuple[float, str],
                                           dtype: Any, batch: dict[str, Any]) -> None:
    """Decodes and a chunked prefill, raw rows on some blocks, GQA 2, padding rows untouched."""
    scene = _scene(4, d, k_spec, v_spec, dtype, **batch)
    numpy_ref.paged_write(scene.host_cache(), scene.key, scene.value, scene.slot_mapping)
    _check_attention(_numba(scene), _reference(scene), scene)


@needs_backend
def test_paged_attention_over_several_tiles_and_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 4 tokens and passes of 4 query rows: the decode over 10 positions takes 3 tiles
    (the online softmax rescales), the prefill's 6 query rows take 2 passes (causal per pass)."""
    from turboquant_codec.backends import numba_paged

    monkeypatch.setattr(numba_paged, "TOKEN_TILES", (4,))
    monkeypatch.setattr(numba_paged, "ROW_TILES", (4,))
    assert numba_paged._tiles(32, 64)[:2] == (4, 4)
    scene = _scene(11, 32, (3.0, "prod"), (3.5, "mse"), np.float32, **SMALL)
    numpy_ref.paged_write(scene.host_cache(), scene.key, scene.value, scene.slot_mapping)
    _check_attention(_numba(scene), _reference(scene), scene)


@needs_backend
def test_paged_attention_reads_raw_rows() -> None:
    """The raw pool is read where a block has a row: with the pool's contents changed after the
    write (raw and compressed copies now disagree), both sides still agree, and the reference's
    answer without raw rows is a different one."""
    scene = _scene(5, 32, (3.5, "mse"), (3.5, "mse"), np.float32, **SMALL)
    numpy_ref.paged_write(scene.host_cache(), scene.key, scene.value, scene.slot_mapping)
    scene.raw_k[:] = -scene.raw_k
    scene.raw_v[:] = 3.0 * scene.raw_v
    want = _reference(scene)
    _check_attention(_numba(scene), want, scene)
    without = _reference(replace(scene, raw_slot_of_block=np.full_like(scene.raw_slot_of_block, -1)))
    rows = int(scene.query_start_loc[-1])
    assert not np.allclose(without[:rows], want[:rows], rtol=0.05)


@needs_backend
def test_paged_attention_raw_slot_past_the_pool_reads_the_records() -> None:
    """PagedCache's rule: a raw_slot_of_block entry past the raw pool is no raw row, here as in the
    reference (the raw pool is changed after the write, so reading it would show)."""
    scene = _scene(7, 32, (3.5, "mse"), (3.5, "mse"), np.float32, **SMALL)
    numpy_ref.paged_write(scene.host_cache(), scene.key, scene.value, scene.slot_mapping)
    scene.raw_k[:] = -scene.raw_k
    rsb = scene.raw_slot_of_block.copy()
    rsb[rsb >= 0] += scene.raw_k.shape[0]  # every raw row past the pool
    past = replace(scene, raw_slot_of_block=rsb)
    want = _reference(past)
    no_raw = _reference(replace(scene, raw_slot_of_block=np.full_like(rsb, -1)))
    assert np.array_equal(want, no_raw)
    _check_attention(_numba(past), want, past)


@needs_backend
def test_paged_attention_hostile_block_ids_stay_in_the_cache() -> None:
    """Block ids past the cache or negative inside a request's used range are skipped (never read
    out of range: the simulator raises on such an index); the other requests' outputs are the
    reference's."""
    scene = _scene(6, 32, (3.5, "mse"), (3.0, "prod"), np.float32, **SMALL)
    numpy_ref.paged_write(scene.host_cache(), scene.key, scene.value, scene.slot_mapping)
    want = _reference(scene)
    table = scene.block_table.copy()
    table[0, 0] = scene.packed.shape[0] + 1000
    table[0, 1] = -7
    got = _numba(replace(scene, block_table=table))
    assert np.isfinite(got).all()
    _check_attention(got, want, scene, first=1)  # request 0 (row 0) read the hostile ids


# ----------------------------------------------------------------------------------------- public API
@needs_backend
def test_public_api_writes_in_place_through_numba_cuda() -> None:
    """``tq.paged_write`` / ``tq.paged_attention`` with ``backend="numba_cuda"`` write the caller's
    strided cache views and ``out`` in place, as the reference does."""
    import turboquant_codec as tq

    scene = _scene(10, 32, (3.5, "mse"), (3.0, "prod"), np.float32, **SMALL)
    before = scene.packed.copy()
    cache, packed, *_ = scene.device_cache()
    tq.paged_write(cache, _put(scene.key), _put(scene.value), _put(scene.slot_mapping), backend=NAME)
    numpy_ref.paged_write(scene.host_cache(), scene.key, scene.value, scene.slot_mapping)
    mask = _written(scene)
    got = _get(packed, np.uint8)
    np.testing.assert_array_equal(got[~mask], before[~mask])
    r_k = scene.k_config.record_bytes
    _records_match(got[mask][:, :r_k], scene.packed[mask][:, :r_k], scene.k_config)
    _records_match(got[mask][:, r_k:], scene.packed[mask][:, r_k:], scene.v_config)
    out = _put(np.full(scene.query.shape, SENTINEL, scene.query.dtype))
    meta = [_put(m) for m in (scene.block_table, scene.seq_lens, scene.query_start_loc)]
    tq.paged_attention(cache, _put(scene.query), _put(scene.key), _put(scene.value), *meta,
                       scale=scene.k_config.d**-0.5, out=out, backend=NAME)
    _check_attention(_get(out, np.float32), _reference(scene), scene)


# -------------------------------------------------------------------------------------- real GPU only
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_gpu_paged_realistic(dtype: Any) -> None:
    """d = 128, 8 KV heads, GQA 4, blocks of 16, decodes over hundreds of tokens and a prefill of
    64 after 100 cached tokens: write, then attend, against the reference."""
    scene = _scene(7, 128, (3.5, "mse"), (3.5, "mse"), dtype, ctx_lens=(700, 333, 129, 100),
                   q_lens=(1, 1, 1, 64), kv_heads=8, groups=4, block_size=16, padding=5)
    _check_write(scene)
    _check_attention(_numba(scene), _reference(scene), scene)


# ---------------------------------------------------------------------------------------- PTX (no GPU)
PTX_SCRIPT = textwrap.dedent(
    """
    from numba import cuda, types as T
    from numba.cuda.dispatcher import CUDADispatcher
    from turboquant_codec.backends import numba_paged as npg

    A = lambda dt, n: T.Array(dt, n, "A")   # strided views, as the caches are
    C = lambda dt, n: T.Array(dt, n, "C")
    i, b, f32, f64 = T.int64, T.boolean, T.float32, T.float64
    tab = (C(f32, 3), C(f32, 3), C(f32, 2), C(T.int32, 2), i, b, f64)
    x, raw = T.uint16, T.float16  # bfloat16 bits in, float16 raw pool: every conversion path
    signatures = {
        "gather_kernel": (A(x, 3), C(i, 1), b, A(i, 1), C(x, 3)),
        "scatter_kernel": (C(T.uint8, 3), C(i, 1), b, A(i, 1), A(T.uint8, 4)),
        "raw_copy_kernel": (A(x, 3), b, A(i, 1), A(T.int32, 1), A(raw, 4), b),
        "paged_attention_kernel": (
            A(x, 3), A(x, 3), A(x, 3), A(T.uint8, 4), A(T.uint8, 4), A(T.int32, 2), b, A(T.int32, 2), b,
            A(raw, 4), A(raw, 4), A(T.int32, 1), b, A(T.int32, 2), A(T.int32, 1), A(T.int32, 1), f32,
            A(x, 3), b, b, b, b, b, i, i, i, *tab, *tab),
    }
    kernels = {n for n, o in vars(npg).items()
               if isinstance(o, CUDADispatcher) and not o.targetoptions.get("device")}
    assert kernels == set(signatures), sorted(kernels ^ set(signatures))
    for name, sig in sorted(signatures.items()):
        ptx, _ = cuda.compile_ptx(getattr(npg, name).py_func, sig, cc=(9, 0))
        assert ".target sm_90" in ptx, name
    print("compiled", len(signatures))
    """
)


PTX_TEST = "test_paged_kernels_compile_to_sm90_ptx"


@pytest.fixture(scope="module", autouse=True)
def ptx_build(request: pytest.FixtureRequest) -> Any:
    """The PTX build, started with the module's first test when the PTX test is selected, so its
    ~20 s of NVVM overlap the simulator tests (one core each)."""
    wanted = any(item.name == PTX_TEST for item in request.session.items)
    if not wanted or importlib.util.find_spec("numba_cuda") is None:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-c", PTX_SCRIPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_paged_kernels_compile_to_sm90_ptx(ptx_build: Any) -> None:
    if ptx_build is None:
        pytest.skip("numba-cuda is not installed")
    out, err = ptx_build.communicate(timeout=600)
    assert ptx_build.returncode == 0, out[-3000:] + err[-6000:]
    assert "compiled 4" in out
