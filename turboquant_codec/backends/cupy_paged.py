"""cupy_raw's paged ops: ``paged_write`` and ``paged_attention`` over a ``PagedCache`` (its layout and
rules: ``turboquant_codec.paged_cache``), kernels in ``cuda/tq_paged.cu``.

What this module owns:

- The fused decode path's layout test (``fast_layout``): a cache whose block size is a multiple of
  16, whose views are 16-byte aligned with block and head strides that are multiples of 16, and whose
  16 token records of one (block, head) lie in one span: K at token stride ``KTS``, V either inside
  K's rows at byte offset ``VOFF`` (``merged``: vLLM's packed ``[num_blocks, H, block_size, R_k +
  R_v]`` tensor) or in a span of its own (stride ``VTS``). Any other cache, and every request past
  ``num_decodes``, takes the generic path: context decoded once, raw rows copied in, float32 causal
  attention (host synchronisation allowed; compute-bound).
- Scratch (``_scratch``): one buffer per (device, use) that only grows and is never freed while the
  process lives, so the decode path allocates nothing and a CUDA graph that captured it keeps valid
  pointers. One caller stream per device at a time is assumed (calls on two streams at once would
  share it, and the side stream).
- Split: chunks of ``split_warps * tiles_per_warp`` 16-token tiles (``tuning.CupyPagedTuning``, the
  settings in force at the call), fixed in tokens, so a request's output is bitwise the same in any
  batch; the raw partials (new token + raw-pool tokens), one block per KV stream and ``raw_part``
  logical blocks (fixed too, merged in the reduce), run in the prep launch, or from
  ``side_min_streams`` KV streams on, on a side stream forked from the caller's and joined before
  the reduce (same kernel, same results: only the overlap changes).
- Shared memory, described once per kernel as it carves it (``occupancy.SharedLayout``):
  tq_paged_split's main loop (``_split_layout``: the pair tables as tq_attn_split's, then the warps'
  rings of page spans) and its closing merge (``cupy_raw_attn.merge_layout``, the same
  ``WarpAttn::merge``); tq_paged_reduce's float32 parts (``_reduce_layout``); the raw partial's pass
  lists and the merge aliasing them (``_raw_smem``).
- Launches (``_LAUNCHES``): per call signature (every array's address, shape, strides and dtype, the
  scalars, the settings object) the kernels' arguments packed once as driver parameter arrays, so a
  repeated call costs the signature and one ``cuLaunchKernel`` per kernel. Builds (``_plan``) are
  keyed on the settings object too: a changed setting builds, plans and packs its own entries.

- Write: ``paged_write`` encodes on the tensor cores straight from the new tokens into their slots
  and raw rows (``tq_write_tc`` in ``cuda/tq_codec.cu``: one launch for K and V when both build the
  same module, no copy, no scratch) wherever ``cupy_raw_tc.use_tc_encode`` holds for both codecs and the
  tokens' rows are 16-byte aligned; otherwise the staged path: transposing copies into scratch,
  ``cupy_raw``'s encode, then ``tq_paged_scatter``. Both write the same bytes.

Host synchronisation: none on the decode path when ``num_decodes`` is given, the layout is fast
and block_table / seq_lens are int32; none in ``paged_write`` when the channels are set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _interop
from .. import tuning as _tuning
from ..config import CodecConfig
from ..encoded import Encoded
from ..paged_cache import PagedCache
from ..tuning import CupyPagedTuning, CupyRawTuning
from . import (
    cupy_launch,
    cupy_raw,
    cupy_raw_attn,
    cupy_raw_build,
    cupy_raw_device,
    cupy_raw_tables,
    cupy_raw_tc,
)
from .cupy_launch import Launch as _Launch
from .cupy_raw import _NULL, _Raw16
from .occupancy import SM90_SMEM_OPTIN, STATIC_SMEM_LIMIT, SharedLayout, resident_blocks

SOURCE = "tq_paged.cu"
# Tokens per tile of the split (tq_attn_common.cuh's TILE: one tensor-core fragment of keys).
TILE = 16
# Threads of a tq_paged_reduce block (_reduce_smem sizes its per-warp scratch from it). The tunable
# launch shapes and thresholds are tuning.CupyPagedTuning's.
REDUCE_THREADS = 256
_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}


def _cupy() -> Any:
    import cupy

    return cupy


# ------------------------------------------------------------------------------------ arrays
def _native(x: Any) -> tuple[Any, str]:
    """(CuPy array holding the data in place: raw 16-bit words for bfloat16, dtype name)."""
    if isinstance(x, _Raw16):
        return x.words, x.dtype
    return x, str(x.dtype)


def _estrides(a: Any) -> tuple[int, ...]:
    return tuple(s // a.itemsize for s in a.strides)


def _extent_end(a: Any) -> int:
    """Address one past the last byte of a strided view (positive strides)."""
    return int(a.data.ptr) + sum((n - 1) * s for n, s in zip(a.shape, a.strides, strict=True)) + a.itemsize


@functools.lru_cache(maxsize=64)
def _graveyard(device: int) -> list[Any]:
    return []


_SCRATCH: dict[tuple[int, str], Any] = {}


def _scratch(device: int, name: str, nbytes: int) -> Any:
    """A device byte buffer of at least ``nbytes`` for one use; grows, and the buffers it outgrows
    are kept (a captured CUDA graph may still point at them)."""
    buf = _SCRATCH.get((device, name))
    if buf is None or buf.size < nbytes:
        if buf is not None:
            _graveyard(device).append(buf)
        cp = _cupy()
        size = max(nbytes, 0 if buf is None else buf.size * 3 // 2, 1024)
        buf = cp.empty((-(-size // 256) * 256,), cp.uint8)
        _SCRATCH[(device, name)] = buf
    return buf


def _carve(buf: Any, parts: Sequence[tuple[tuple[int, ...], Any]]) -> list[Any]:
    """Typed views of ``buf`` (256-byte aligned), one per (shape, dtype)."""
    out, at = [], 0
    for shape, dtype in parts:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        out.append(buf[at:at + nbytes].view(dtype).reshape(shape))
        at += -(-nbytes // 256) * 256
    return out


def _carve_bytes(parts: Sequence[tuple[tuple[int, ...], Any]]) -> int:
    return sum(-(-math.prod(s) * np.dtype(d).itemsize // 256) * 256 for s, d in parts)


# ------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Layout:
    """Where a tile's records lie (bytes): K at token stride ``kts``; V inside K's rows at ``voff``
    (``merged``) or at its own token stride ``vts``."""

    merged: bool
    kts: int
    vts: int
    voff: int


def raw_part(tuning: CupyPagedTuning | None = None) -> int:
    """Logical blocks per part of a raw partial (tq_paged.cu's RAW_PART) under ``tuning`` (default:
    the settings in force): 1024 by default, 16k tokens at block size 16."""
    t = _tuning.current().cupy_paged if tuning is None else tuning
    return 32 * t.split_warps * t.raw_scan


def fast_layout(cache: PagedCache, tuning: CupyPagedTuning | None = None) -> Layout | None:
    """The fused decode kernel's layout of ``cache`` (CuPy views) under ``tuning`` (default: the
    settings in force), or None: generic path."""
    tuning = _tuning.current().cupy_paged if tuning is None else tuning
    k, v = cache.k_cache, cache.v_cache
    if cache.block_size % TILE or k.shape[0] == 0 or cache.head_dim % 32:
        return None  # (the raw partial gives each lane head_dim / 32 dims)
    for a in (k, v):
        s0, s1, s2, s3 = a.strides
        if s3 != 1 or min(s0, s1, s2) <= 0 or s0 % 16 or s2 % 16 or s1 % 4:
            return None
    if k.data.ptr % 16:
        return None
    r_k, r_v = cache.k_config.record_bytes, cache.v_config.record_bytes
    voff = int(v.data.ptr) - int(k.data.ptr)
    if k.strides == v.strides and r_k <= voff and voff + r_v <= k.strides[1]:
        layout = Layout(True, k.strides[1], k.strides[1], voff)
    elif v.data.ptr % 16:
        return None
    else:
        layout = Layout(False, k.strides[1], v.strides[1], 0)
    if _stage_bytes(layout) > tuning.max_stage_bytes:
        return None
    if cache.has_raw:  # raw rows are read in 16-byte chunks
        for pool in (cache.raw_k, cache.raw_v):
            w, _ = _native(pool)
            if w.data.ptr % 16 or w.strides[3] != w.itemsize or any(x % 16 for x in w.strides[:3]) or (
                    w.shape[3] * w.itemsize) % 16:
                return None
    return layout


def _stage_bytes(layout: Layout) -> int:
    span = TILE * layout.kts + 32 + (0 if layout.merged else TILE * layout.vts + 32)
    return -(-span // 16) * 16


def compile_options(kind: str, **p: Any) -> list[str]:
    """``-D`` options of tq_paged.cu: ``kind`` "attention" (k_cfg, v_cfg, dtype, new_dtype,
    raw_dtype, out_dtype, group, block_size, layout; optional tuning, a ``CupyPagedTuning``, default
    the settings in force) or "write" (k_cfg, v_cfg, new_dtype, raw_dtype). Also what
    ``tests/test_cuda_sources.py`` compiles with nvcc."""
    k_cfg, v_cfg = p["k_cfg"], p["v_cfg"]
    base = [*cupy_raw_build.codec_macros("K", k_cfg), *cupy_raw_build.codec_macros("V", v_cfg),
            f"-DNEW_KIND={_KIND[p['new_dtype']]}",
            f"-DRAW_KIND={_KIND[p.get('raw_dtype') or p['new_dtype']]}"]
    if kind == "write":
        return [*base, "-DTQ_PAGED_WRITE=1"]
    lay: Layout = p["layout"]
    t: CupyPagedTuning = p.get("tuning") or _tuning.current().cupy_paged
    return [*base, f"-DIN_KIND={_KIND[p['dtype']]}", f"-DOUT_KIND={_KIND[p['out_dtype']]}",
            f"-DGQ={p['group']}", f"-DKV_SAME_LUT={int(cupy_raw_tables.same_lut(k_cfg, v_cfg))}",
            f"-DNWARPS={t.split_warps}", f"-DTPW={t.tiles_per_warp}",
            f"-DRAW_U={max(1, min(t.raw_u, 16 // p['group']))}", f"-DRAW_SCAN={t.raw_scan}",
            f"-DSTAGES={_stages(k_cfg, v_cfg, lay, t)}", "-DMINBLOCKS=1", f"-DBS={p['block_size']}",
            f"-DMERGED={int(lay.merged)}", f"-DKTS={lay.kts}", f"-DVTS={lay.vts}", f"-DVOFF={lay.voff}"]


def _tables_bytes(k_cfg: CodecConfig, v_cfg: CodecConfig) -> int:
    """The pair tables at the start of tq_paged_split's shared memory (as tq_attn_split's)."""
    return SharedLayout(cupy_raw_attn.pair_tables(k_cfg, v_cfg)).nbytes


def _stages(k_cfg: CodecConfig, v_cfg: CodecConfig, layout: Layout, tuning: CupyPagedTuning) -> int:
    tables = _tables_bytes(k_cfg, v_cfg)
    for stages in range(tuning.stages, 1, -1):
        if tables + tuning.split_warps * stages * _stage_bytes(layout) <= SM90_SMEM_OPTIN:
            return stages
    raise ValueError(f"paged attention tables of {k_cfg} / {v_cfg} do not fit shared memory")


def _split_layout(k_cfg: CodecConfig, v_cfg: CodecConfig, layout: Layout, tuning: CupyPagedTuning
                  ) -> SharedLayout:
    """tq_paged_split's main loop: the pair tables | per warp a ring of stages, each one 16-token span
    of a page's records (``_stage_bytes``)."""
    ring = tuning.split_warps * _stages(k_cfg, v_cfg, layout, tuning) * _stage_bytes(layout)
    return SharedLayout((*cupy_raw_attn.pair_tables(k_cfg, v_cfg), ("rings", ring)))


def _split_smem(k_cfg: CodecConfig, v_cfg: CodecConfig, group: int, layout: Layout,
                tuning: CupyPagedTuning) -> int:
    """Dynamic shared memory of tq_paged_split: the larger of its main loop and its closing merge
    (``WarpAttn::merge``, tq_attn_split's, reusing the buffer)."""
    merge = cupy_raw_attn.merge_smem(v_cfg, group, tuning.split_warps)
    return max(_split_layout(k_cfg, v_cfg, layout, tuning).nbytes, merge)


def _reduce_layout(v_cfg: CodecConfig, nchunks: int) -> SharedLayout:
    """tq_paged_reduce, float32: weights w[nchunks] | merged accumulator y[VQD] | un-rotated row z[D] |
    reduction scratch red[32] | per-warp partial sums yw[nwarps][VQD] | merged raw partial ra[D]."""
    vqd, d = cupy_raw_tables.fdims(v_cfg), v_cfg.d
    floats = (("w", nchunks), ("y", vqd), ("z", d), ("red", 32), ("yw", REDUCE_THREADS // 32 * vqd),
              ("ra", d))
    return SharedLayout(tuple((name, 4 * n) for name, n in floats))


def _reduce_smem(v_cfg: CodecConfig, nchunks: int) -> int:
    """Bytes of ``_reduce_layout``."""
    return _reduce_layout(v_cfg, nchunks).nbytes


@dataclass(frozen=True)
class _Plan:
    """The kernels of one paged-attention configuration, their shared memory and tables."""

    prep: Any
    split: Any
    reduce: Any
    raw_smem: int
    split_smem: int
    tables: tuple[Any, Any, Any, Any]


@functools.lru_cache(maxsize=256)
def _plan(device: int, k_cfg: CodecConfig, v_cfg: CodecConfig, dtype: str, new_dtype: str, raw_dtype: str,
          out_dtype: str, group: int, block_size: int, layout: Layout, tuning: CupyPagedTuning) -> _Plan:
    opts = compile_options("attention", k_cfg=k_cfg, v_cfg=v_cfg, dtype=dtype, new_dtype=new_dtype,
                           raw_dtype=raw_dtype, out_dtype=out_dtype, group=group, block_size=block_size,
                           layout=layout, tuning=tuning)
    mod = cupy_raw_build.module(device, SOURCE, tuple(opts))
    prep = mod.get_function("tq_paged_prep")
    split, reduce = mod.get_function("tq_paged_split"), mod.get_function("tq_paged_reduce")
    smem = _split_smem(k_cfg, v_cfg, group, layout, tuning)
    if smem > 48 * 1024:
        split.max_dynamic_shared_size_bytes = smem
    raw_smem = _raw_smem(group, k_cfg.d, tuning)
    if raw_smem > 48 * 1024:
        prep.max_dynamic_shared_size_bytes = raw_smem
    reduce_max = _reduce_smem(v_cfg, 4096)
    if reduce_max > 48 * 1024:
        reduce.max_dynamic_shared_size_bytes = reduce_max
    # Driver functions, called directly (a RawKernel looks its function up on every call).
    tables = (*cupy_raw_tables.device_tables(device, k_cfg), *cupy_raw_tables.device_tables(device, v_cfg))
    return _Plan(prep.kernel, split.kernel, reduce.kernel, raw_smem, smem, tables)


@functools.lru_cache(maxsize=64)
def _write_kernel(device: int, k_cfg: CodecConfig, v_cfg: CodecConfig, new_dtype: str, raw_dtype: str) -> Any:
    opts = compile_options("write", k_cfg=k_cfg, v_cfg=v_cfg, new_dtype=new_dtype, raw_dtype=raw_dtype)
    return cupy_raw_build.module(device, SOURCE, tuple(opts)).get_function("tq_paged_scatter")


def _raw_params(cache: PagedCache, key: Any, value: Any) -> tuple[tuple[Any, ...], str]:
    """tq_paged.cu's RAW_PARAMS (new tokens and raw pool, element strides) and the pool's dtype."""
    kw, _ = _native(key)
    vw, _ = _native(value)
    ks, vs = _estrides(kw), _estrides(vw)
    if cache.has_raw:
        rk, raw_dtype = _native(cache.raw_k)
        rv, _ = _native(cache.raw_v)
        rks, rvs = _estrides(rk), _estrides(rv)
        pool = (rk, rv, *(np.int64(s) for s in rks[:3]), *(np.int64(s) for s in rvs[:3]),
                np.int32(rk.shape[0]))
    else:
        raw_dtype = _native(key)[1]
        pool = (_NULL, _NULL, *(np.int64(0),) * 6, np.int32(0))
    return (kw, vw, np.int64(ks[0]), np.int64(ks[1]), np.int64(vs[0]), np.int64(vs[1]), *pool), raw_dtype


def _int32(a: Any) -> Any:
    """``a`` as a C-contiguous int32 CuPy array (a copy, hence an allocation, only when it is not)."""
    cp = _cupy()
    if a.dtype == cp.int32 and a.flags.c_contiguous:
        return a
    return cp.ascontiguousarray(a, dtype=cp.int32)


# ------------------------------------------------------------------------------------ write
@functools.lru_cache(maxsize=64)
def _write_tc_plan(device: int, cfg: CodecConfig, dtype: str, raw_dtype: str,
                   tuning: CupyRawTuning) -> tuple[Any, tuple[str, ...]]:
    """(tq_write_tc's plan, its build options) for ``cfg``, ``dtype`` new tokens and ``raw_dtype``
    raw pool under ``tuning`` (the encode's launch shape, as ``cupy_raw``'s tq_encode_tc). K and V
    whose options are equal share one build, hence one launch."""
    wgmma, warps, mt = cupy_raw_build.tc_launch(device, cfg, dtype, tuning)
    opts = (*cupy_raw_build.compile_options("codec", cfg=cfg, dtype=dtype, wgmma=wgmma, warps=warps, mt=mt),
            f"-DRAW_KIND={_KIND[raw_dtype]}", *(("-arch=sm_90a",) if wgmma else ()))
    fn = cupy_raw_build.module(device, "tq_codec.cu", opts).get_function("tq_write_tc")
    smem = cupy_raw_tc.encode_smem(cfg, dtype, warps, mt)
    if smem > STATIC_SMEM_LIMIT:
        fn.max_dynamic_shared_size_bytes = smem
    attrs = _cupy().cuda.Device(device).attributes
    per_sm = resident_blocks(int(fn.num_regs), int(fn.shared_size_bytes) + smem, 32 * warps,
                             attrs["MaxRegistersPerMultiprocessor"],
                             attrs["MaxSharedMemoryPerMultiprocessor"], attrs["MaxThreadsPerMultiProcessor"])
    plan = cupy_raw._TcPlan(fn, cupy_raw_tables.device_tc_table(device, cfg, dtype, wgmma), smem,
                            per_sm * cupy_raw_device.sm_count(device), warps, 16 * mt)
    return plan, opts


def _rows_aligned(xw: Any) -> bool:
    """Whether the new tokens [T, H, d] can be staged in place: 16-byte aligned contiguous rows."""
    return (xw.data.ptr % 16 == 0 and xw.strides[2] == xw.itemsize and xw.strides[0] % 16 == 0
            and xw.strides[1] % 16 == 0)


def _write_tc(cache: PagedCache, kw: Any, vw: Any, dtype: str, channels: Sequence[Any], slots: Any, n: int,
              device: int) -> bool:
    """``tq_write_tc``: the new tokens encoded on the tensor cores straight into their slots and raw
    rows (one launch for K and V of one build, else one each); False where it does not apply (the
    caller encodes through scratch). No allocation where channels, slots and block map are already
    contiguous."""
    cp = _cupy()
    k_cfg, v_cfg = cache.k_config, cache.v_config
    kc, vc = cache.k_cache, cache.v_cache
    tuning = _tuning.current().cupy_raw
    tc = cupy_raw_tc.use_tc_encode(k_cfg, n, tuning) and cupy_raw_tc.use_tc_encode(v_cfg, n, tuning)
    if (not tc
            or not (_rows_aligned(kw) and _rows_aligned(vw)) or kc.strides[3] != 1 or vc.strides[3] != 1):
        return False
    raw, raw_dtype = _raw_params(cache, kw, vw)
    plans = [_write_tc_plan(device, cfg, dtype, raw_dtype, tuning) for cfg in (k_cfg, v_cfg)]
    wide = all(c.data.ptr % 4 == 0 and all(x % 4 == 0 for x in c.strides[:3]) and cfg.record_bytes % 4 == 0
               for c, cfg in ((kc, k_cfg), (vc, v_cfg)))
    chs = []
    for ch in channels:
        c = None if ch is None else cp.ascontiguousarray(ch, dtype=cp.uint16)
        chs.append(c.copy() if c is not None and c.data.ptr % 16 else c)
    if slots.dtype not in (cp.int32, cp.int64) or not slots.flags.c_contiguous:
        slots = cp.ascontiguousarray(slots, dtype=cp.int64)
    rsb = _int32(cache.raw_slot_of_block) if cache.has_raw else None
    rk, rv, rks, rvs, num_raw = raw[6], raw[7], raw[8:11], raw[11:14], raw[14]
    sets = [(kw, chs[0], kc, rk, rks, plans[0][0].table), (vw, chs[1], vc, rv, rvs, plans[1][0].table)]

    def args(x: Any, ch: Any, c: Any, pool: Any, ps: Sequence[Any], table: Any) -> tuple[Any, ...]:
        return (x, np.int64(x.strides[0]), np.int64(x.strides[1]), _NULL if ch is None else ch, c,
                *(np.int64(st) for st in c.strides[:3]), pool, *ps, table)

    h = cache.num_kv_heads
    head = (np.int32(n), np.int32(h), slots, np.int32(slots.dtype == cp.int64), np.int32(cache.num_blocks),
            np.int32(cache.block_size), _NULL if rsb is None else rsb, num_raw, np.int32(wide))
    groups = [[0, 1]] if plans[0][1] == plans[1][1] else [[0], [1]]
    for group in groups:
        plan = plans[group[0]][0]
        tiles = h * -(-n // plan.vectors)
        gx = max(1, min(plan.blocks // len(group), -(-tiles // plan.warps)))
        set0 = args(*sets[group[0]])
        set1 = args(*sets[group[-1]])
        plan.fn((gx, len(group)), (32 * plan.warps,), (*head, *set0, *set1), shared_mem=plan.smem)
    return True


def _encode_into(xw: Any, dtype: str, cfg: CodecConfig, ch: Any, rec: Any, device: int) -> None:
    """``cupy_raw.encode``'s kernels into a given records buffer (no allocation): xw [H, n, d]
    C-contiguous and 16-byte aligned, rec [H, n, R]."""
    cupy_raw.encode_into(xw, dtype, cfg, ch, rec, device)


def paged_write(cache: PagedCache, key: Any, value: Any, slot_mapping: Any) -> tuple[Any, Any]:
    """Encode the new tokens into their slots and raw rows, as ``numpy_ref.paged_write``.

    Parameters
    ----------
    cache : PagedCache of CuPy arrays (``_Raw16`` for bfloat16 raw pools)
    key, value : [T, H, d] float16/bfloat16/float32
    slot_mapping : [<= T] int32/int64; negative slots (padding) and slots past the cache are skipped

    Returns
    -------
    (k_channels, v_channels) : [H, d] uint16 or None
        As given; chosen from the non-padding tokens (a host synchronisation) where None and the
        configuration splits channels.
    """
    cp = _cupy()
    kw, dtype = _native(key)
    device = int(kw.device.id)
    k_cfg, v_cfg = cache.k_config, cache.v_config
    channels = [cache.k_channels, cache.v_channels]
    with cp.cuda.Device(device), cupy_raw._stream(device):
        n = int(slot_mapping.shape[0])
        if n == 0:
            return channels[0], channels[1]
        h, d = int(kw.shape[1]), int(kw.shape[2])
        words = [kw[:n].transpose(1, 0, 2), _native(value)[0][:n].transpose(1, 0, 2)]  # [H, n, d]
        cfgs = (k_cfg, v_cfg)
        for i in range(2):
            if cfgs[i].split and channels[i] is None:
                rows = cp.nonzero(slot_mapping >= 0)[0]
                if int(rows.size) == 0:
                    return channels[0], channels[1]
                picked = cp.ascontiguousarray(words[i][:, rows])
                channels[i] = cupy_raw.select_channels(picked, cfgs[i], dtype)
        if _write_tc(cache, kw, _native(value)[0], dtype, channels, slot_mapping, n, device):
            return channels[0], channels[1]
        wdt = kw.dtype
        parts = [((h, n, d), wdt), ((h, n, d), wdt), ((h, n, k_cfg.record_bytes), cp.uint8),
                 ((h, n, v_cfg.record_bytes), cp.uint8)]
        xk, xv, krec, vrec = _carve(_scratch(device, "write", _carve_bytes(parts)), parts)
        for x, src, cfg, ch, rec in ((xk, words[0], k_cfg, channels[0], krec),
                                     (xv, words[1], v_cfg, channels[1], vrec)):
            cp.copyto(x, src)
            chc = None if ch is None else cp.ascontiguousarray(ch, dtype=cp.uint16)
            _encode_into(x, dtype, cfg, chc, rec, device)
        raw, raw_dtype = _raw_params(cache, key, value)
        fn = _write_kernel(device, k_cfg, v_cfg, dtype, raw_dtype)
        kc, vc = cache.k_cache, cache.v_cache
        rsb = _int32(cache.raw_slot_of_block) if cache.has_raw else None
        slots = slot_mapping
        if slots.dtype not in (cp.int32, cp.int64) or not slots.flags.c_contiguous:
            slots = cp.ascontiguousarray(slots, dtype=cp.int64)
        fn((n,), (128,), (krec, vrec, np.int32(n), np.int32(h), slots, np.int32(slots.dtype == cp.int64),
                          np.int32(n), kc, vc, *(np.int64(s) for s in kc.strides[:3]),
                          *(np.int64(s) for s in vc.strides[:3]), np.int32(cache.num_blocks),
                          np.int32(cache.block_size), rsb if rsb is not None else _NULL, *raw))
        return channels[0], channels[1]


# ------------------------------------------------------------------------------------ attention
def paged_attention(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                    query_start_loc: Any, scale: float, out: Any, num_decodes: int | None) -> Any:
    """Causal attention of a batch mixing decode and prefill requests, as ``numpy_ref.paged_attention``.

    The first ``num_decodes`` requests (one query row each, row r = request r) run the fused decode
    kernels when ``fast_layout(cache)`` holds; the rest, and every request of another layout, the
    generic path. ``num_decodes`` None counts the leading one-token requests (a host sync).

    Returns
    -------
    ``out`` [T, h_q, d], written in place (padding rows untouched).
    """
    cp = _cupy()
    qw = query.words if isinstance(query, _Raw16) else query
    device = qw.data.device_id
    tuning = _tuning.current().cupy_paged
    with cp.cuda.Device(device):
        b = block_table.shape[0]
        if num_decodes is None:
            q_lens = np.diff(cp.asnumpy(query_start_loc).astype(np.int64))
            num_decodes = int(np.argmin(q_lens == 1)) if not np.all(q_lens == 1) else b
        n_fast = min(num_decodes, b)
        if n_fast and not _decode(cache, query, key, value, block_table, seq_lens, scale, out, n_fast,
                                  device, tuning):
            n_fast = 0
        if n_fast < b:
            with cupy_raw._stream(device):
                _generic(cache, query, key, value, block_table, seq_lens, query_start_loc, scale, out, n_fast,
                         tuning.generic_rows)
        return out


def _sig(a: Any) -> Any:
    """What a launch's arguments depend on for one array: its ``_interop.gpu_key``; a ``_Raw16``'s
    is its words' key and its dtype name (its words are uint16, whatever they hold)."""
    if isinstance(a, _Raw16):
        key = _interop.gpu_key(a.words)
        return None if key is None else (*key, a.dtype)
    return _interop.gpu_key(a)


def _p(a: Any) -> Any:
    """An array argument as its device address (cached launches hold no references)."""
    return _NULL if a is None else np.uint64(a.data.ptr)


# Launches of recent decode calls, keyed on everything their arguments depend on (_sig of each
# array, the scalars, the CupyPagedTuning they were planned under); None = the cache's layout is
# not fused (generic path). A hit costs the key and three driver calls. Bounded; cleared when full.
_LAUNCHES: dict[tuple[Any, ...], tuple[_Launch | None, _Launch, _Launch, _Launch] | None] = {}
_MAX_LAUNCHES = 1024


def _decode_sig(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                scale: float, out: Any, n: int, device: int, tuning: CupyPagedTuning) -> tuple[Any, ...]:
    return (device, n, scale, tuning, cache.k_config, cache.v_config,
            *(_sig(a) for a in (query, key, value, block_table, seq_lens, out, cache.k_cache, cache.v_cache,
                                 cache.k_channels, cache.v_channels, cache.raw_k, cache.raw_v,
                                 cache.raw_slot_of_block)))


def paged_attention_replay(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any,
                           seq_lens: Any, query_start_loc: Any, scale: float, out: Any,
                           num_decodes: int | None) -> Any:
    """A callable that repeats this call (already made) without arguments and holding no array: its
    cached launches on the then current stream. None unless every request took the fused decode
    path with launches kept (see ``_LAUNCHES``)."""
    b = int(block_table.shape[0])
    if num_decodes is None or num_decodes < b or b == 0:
        return None
    qw = query.words if isinstance(query, _Raw16) else query
    device = int(qw.data.device_id)
    launches = _LAUNCHES.get(_decode_sig(cache, query, key, value, block_table, seq_lens, scale, out, b,
                                         device, _tuning.current().cupy_paged))
    if launches is None:
        return None
    return functools.partial(cupy_launch.on_device, device, _run, launches, device)


def _decode(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
            scale: float, out: Any, n: int, device: int, tuning: CupyPagedTuning) -> bool:
    """The fused decode kernels for requests 0..n-1 (prep, split, reduce; no host sync), on the
    current stream, planned under ``tuning``; False (nothing launched) where the cache's layout is
    not fused."""
    sig = _decode_sig(cache, query, key, value, block_table, seq_lens, scale, out, n, device, tuning)
    if sig in _LAUNCHES:
        launches = _LAUNCHES[sig]
    else:
        layout = fast_layout(cache, tuning)
        keep: list[Any] = []
        launches = None if layout is None else _build_decode(
            cache, layout, query, key, value, block_table, seq_lens, scale, out, n, device, tuning, keep)
        if keep:  # converted copies (int32, contiguous): this call's launch only
            if launches is not None:
                _run(launches, device)
            return True
        if len(_LAUNCHES) >= _MAX_LAUNCHES:
            _LAUNCHES.clear()
        _LAUNCHES[sig] = launches
    if launches is None:
        return False
    _run(launches, device)
    return True


@functools.lru_cache(maxsize=16)
def _side(device: int) -> tuple[Any, Any, Any]:
    """(side stream, fork event, join event) of ``device``: the raw partial runs beside prep and split."""
    cp = _cupy()
    with cp.cuda.Device(device):
        return (cp.cuda.Stream(non_blocking=True), cp.cuda.Event(block=False, disable_timing=True),
                cp.cuda.Event(block=False, disable_timing=True))


def _run(launches: tuple[_Launch | None, _Launch, _Launch, _Launch], device: int) -> None:
    """prep (with the raw partials), split, reduce on the current stream; or with the raw partials on
    the side stream forked from it and joined before reduce. Event record and wait are stream
    operations, so a CUDA graph capture follows the fork and the join."""
    main = cupy_raw._stream(device).ptr
    raws, prep, split, reduce = launches
    if raws is None:
        prep(main)
        split(main)
        reduce(main)
        return
    rt = _cupy().cuda.runtime
    side, fork, join = _side(device)
    rt.eventRecord(fork.ptr, main)
    rt.streamWaitEvent(side.ptr, fork.ptr, 0)
    raws(side.ptr)
    rt.eventRecord(join.ptr, side.ptr)
    prep(main)
    split(main)
    rt.streamWaitEvent(main, join.ptr, 0)
    reduce(main)


def _raw_smem(group: int, d: int, tuning: CupyPagedTuning) -> int:
    """Dynamic shared memory of tq_paged_prep's raw-partial blocks (raw_partial): the pass lists (two
    int32 per logical block of a part, and 32), later aliased by the warps' merge, float32
    macc[NW][GQ][D] | mm[NW][GQ] | ml[NW][GQ]."""
    lists = SharedLayout((("lists", 4 * (2 * raw_part(tuning) + 32)),))
    per = 4 * tuning.split_warps * group
    merge = SharedLayout((("macc", per * d), ("mm", per), ("ml", per)))
    return max(lists.nbytes, merge.nbytes)


def _build_decode(cache: PagedCache, layout: Layout, query: Any, key: Any, value: Any, block_table: Any,
                  seq_lens: Any, scale: float, out: Any, n: int, device: int, tuning: CupyPagedTuning,
                  keep: list[Any]) -> tuple[_Launch | None, _Launch, _Launch, _Launch]:
    """The three launches of ``_decode`` under ``tuning``; arrays converted on the way (int32,
    contiguous) go to ``keep``: such launches are for this call only."""
    cp = _cupy()
    qw, dtype = _native(query)
    ow, out_dtype = _native(out)
    h_q, d = int(qw.shape[1]), int(qw.shape[2])
    h = cache.num_kv_heads
    group = h_q // h
    k_cfg, v_cfg = cache.k_config, cache.v_config
    raw, raw_dtype = _raw_params(cache, key, value)
    raw = tuple(_p(a) if isinstance(a, cp.ndarray) else a for a in raw)
    num_raw = raw[-1]  # rows of the raw pool (RAW_PARAMS' last), 0 without one
    new_dtype = _native(key)[1]
    warps = tuning.split_warps
    plan = _plan(device, k_cfg, v_cfg, dtype, new_dtype, raw_dtype, out_dtype, group, cache.block_size,
                 layout, tuning)
    ktab, klut, vtab, vlut = plan.tables
    bt, sl = _int32(block_table), _int32(seq_lens)
    keep += [x for x, y in ((bt, block_table), (sl, seq_lens)) if x is not y]
    max_blocks = int(bt.shape[1])
    max_tokens = max_blocks * cache.block_size
    ntiles = -(-max_tokens // TILE)
    nchunks = max(1, -(-ntiles // (warps * tuning.tiles_per_warp)))
    raw_parts = max(1, -(-max_blocks // raw_part(tuning)))
    rows, streams = n * h_q, n * h
    kqd, vqd = cupy_raw_tables.fdims(k_cfg), cupy_raw_tables.fdims(v_cfg)
    parts = [((rows, 2, kqd), cp.uint16), ((rows,), cp.float32),
             ((streams * nchunks * group,), cp.float32), ((streams * nchunks * group,), cp.float32),
             ((streams * nchunks * group, vqd), cp.float32), ((rows * raw_parts,), cp.float32),
             ((rows * raw_parts,), cp.float32), ((rows * raw_parts, d), cp.float32)]
    qh, qscale, part_m, part_l, part_acc, raw_m, raw_l, raw_acc = (
        _p(a) for a in _carve(_scratch(device, "attention", _carve_bytes(parts)), parts))
    kch, vch = cache.k_channels, cache.v_channels
    kch = None if kch is None else cp.ascontiguousarray(kch, dtype=cp.uint16)
    vch = None if vch is None else cp.ascontiguousarray(vch, dtype=cp.uint16)
    keep += [x for x, y in ((kch, cache.k_channels), (vch, cache.v_channels)) if x is not y]
    qs, os_ = _estrides(qw), _estrides(ow)
    kc, vc = cache.k_cache, cache.v_cache
    end = np.uint64(max(_extent_end(kc), _extent_end(vc)))
    rsb = _int32(cache.raw_slot_of_block) if cache.has_raw else None
    if rsb is not cache.raw_slot_of_block:
        keep.append(rsb)
    fscale = np.float32(scale)
    side = streams >= tuning.side_min_streams
    tail = (_p(bt), np.int32(bt.strides[0] // 4), np.int32(max_blocks), _p(sl), _p(rsb),
            np.int32(cache.num_blocks), np.int32(h), np.int32(raw_parts), raw_m, raw_l, raw_acc, *raw)
    head = (_p(qw), np.int64(qs[0]), np.int64(qs[1]), np.int32(h_q), _p(kch), _p(ktab), fscale, qh, qscale)
    raws = _Launch(plan.prep, (streams * raw_parts,), (32 * warps,), (*head, np.int32(0), *tail),
                   plan.raw_smem) if side else None
    prep = _Launch(plan.prep, (rows + (0 if side else streams * raw_parts),),
                   (tuning.side_row_threads if side else 32 * warps,),
                   (*head, np.int32(rows), *tail), 0 if side else plan.raw_smem)
    split = _Launch(plan.split, (nchunks, streams), (32 * warps,),
                    (_p(kc), _p(vc), end, end, np.int64(kc.strides[0]), np.int64(kc.strides[2]),
                     np.int64(vc.strides[0]), np.int64(vc.strides[2]), _p(bt), np.int32(bt.strides[0] // 4),
                     np.int32(max_blocks), _p(sl), _p(rsb), np.int32(cache.num_blocks), num_raw, np.int32(h),
                     qh, qscale, _p(klut), _p(vlut), part_m, part_l, part_acc), plan.split_smem)
    reduce = _Launch(plan.reduce, (rows,), (REDUCE_THREADS,),
                     (part_m, part_l, part_acc, np.int32(nchunks), raw_m, raw_l, raw_acc, np.int32(raw_parts),
                      _p(sl),
                      np.int32(max_tokens), np.int32(h_q), _p(vtab), _p(vch), _p(ow), np.int64(os_[0]),
                      np.int64(os_[1])), _reduce_smem(v_cfg, nchunks))
    return raws, prep, split, reduce


# ------------------------------------------------------------------------------------ generic path
def _to_f32(x: Any, dtype: str) -> Any:
    """float32 copy of a CuPy array (bfloat16 as raw words)."""
    cp = _cupy()
    if dtype == "bfloat16":
        return (x.astype(cp.uint32) << 16).view(cp.float32)
    return x.astype(cp.float32)


def _from_f32(x: Any, dtype: str) -> Any:
    """float32 -> the dtype's storage (bfloat16: words, round to nearest even)."""
    cp = _cupy()
    if dtype == "bfloat16":
        u = cp.ascontiguousarray(x, dtype=cp.float32).view(cp.uint32)
        return ((u + cp.uint32(0x7FFF) + ((u >> 16) & cp.uint32(1))) >> 16).astype(cp.uint16)
    return x.astype(dtype)


def _context(cache: PagedCache, table_row: np.ndarray, ctx: int) -> tuple[Any, Any, Any]:
    """One request's first ``ctx`` cached tokens as float32 K, V [H, ctx, d] (decoded once, raw rows
    copied in) and which of them exist (a block id out of range masks its tokens)."""
    cp = _cupy()
    h, d, bs = cache.num_kv_heads, cache.head_dim, cache.block_size
    pos = np.arange(ctx)
    blocks, offsets = table_row[pos // bs].astype(np.int64), pos % bs
    valid = (blocks >= 0) & (blocks < cache.num_blocks)
    raw_rows = np.full(ctx, -1, np.int64)
    if cache.has_raw and valid.any():
        rsb = cp.asnumpy(cache.raw_slot_of_block).astype(np.int64)
        raw_rows[valid] = rsb[blocks[valid]]
        raw_rows[raw_rows >= int(_native(cache.raw_k)[0].shape[0])] = -1
    comp = valid & (raw_rows < 0)
    k = cp.zeros((h, ctx, d), cp.float32)
    v = cp.zeros((h, ctx, d), cp.float32)
    if comp.any():
        bi, oi = cp.asarray(blocks[comp]), cp.asarray(offsets[comp])
        for dst, records, cfg, ch in ((k, cache.k_cache, cache.k_config, cache.k_channels),
                                      (v, cache.v_cache, cache.v_config, cache.v_channels)):
            rec = cp.ascontiguousarray(records[bi, oi].transpose(1, 0, 2))
            dst[:, cp.asarray(np.flatnonzero(comp))] = cupy_raw.decode(Encoded(rec, ch, cfg))
    from_raw = raw_rows >= 0
    if from_raw.any():
        at = cp.asarray(np.flatnonzero(from_raw))
        ri, oi = cp.asarray(raw_rows[from_raw]), cp.asarray(offsets[from_raw])
        for dst, pool in ((k, cache.raw_k), (v, cache.raw_v)):
            pw, pdt = _native(pool)
            dst[:, at] = _to_f32(pw[ri, oi], pdt).transpose(1, 0, 2)
    return k, v, cp.asarray(valid | from_raw)


def _generic(cache: PagedCache, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
             query_start_loc: Any, scale: float, out: Any, first: int, rows_per_product: int) -> None:
    """Requests ``first``.. : context decoded once, float32 causal attention (host syncs), at most
    ``rows_per_product`` query rows per dense product."""
    cp = _cupy()
    qw, qdt = _native(query)
    kw, kdt = _native(key)
    vw, _ = _native(value)
    ow, odt = _native(out)
    starts = cp.asnumpy(query_start_loc).astype(np.int64)
    seq = cp.asnumpy(seq_lens).astype(np.int64)
    table = cp.asnumpy(block_table).astype(np.int64)
    h_q, h, d = int(qw.shape[1]), cache.num_kv_heads, cache.head_dim
    group = h_q // h
    for r in range(first, int(seq.shape[0])):
        q0, q1 = int(starts[r]), int(starts[r + 1])
        n = q1 - q0
        if n <= 0 or q0 < 0 or q1 > int(qw.shape[0]) or int(seq[r]) < n:
            continue  # no rows, or rows the step does not hold: left unwritten (as numba_paged)
        ctx = max(0, min(int(seq[r]) - n, table.shape[1] * cache.block_size))
        k_ctx, v_ctx, have = _context(cache, table[r], ctx)
        k_all = cp.concatenate([k_ctx, _to_f32(kw[q0:q1], kdt).transpose(1, 0, 2)], axis=1)
        v_all = cp.concatenate([v_ctx, _to_f32(vw[q0:q1], kdt).transpose(1, 0, 2)], axis=1)
        q = _to_f32(qw[q0:q1], qdt).reshape(n, h, group, d).transpose(1, 2, 0, 3)  # [H, G, n, d]
        for i0 in range(0, n, rows_per_product):
            i1 = min(n, i0 + rows_per_product)
            logits = cp.matmul(q[:, :, i0:i1], k_all.transpose(0, 2, 1)[:, None]) * np.float32(scale)
            j = cp.arange(ctx + n)
            allowed = (j[None, :] <= ctx + cp.arange(i0, i1)[:, None]) & cp.concatenate(
                [have, cp.ones(n, bool)])[None, :]
            logits = cp.where(allowed, logits, -cp.inf)
            logits -= logits.max(axis=-1, keepdims=True)
            weights = cp.exp(logits)
            weights /= weights.sum(axis=-1, keepdims=True)
            o = cp.matmul(weights, v_all[:, None])  # [H, G, rows, d]
            ow[q0 + i0:q0 + i1] = _from_f32(o.transpose(2, 0, 1, 3).reshape(i1 - i0, h_q, d), odt)
