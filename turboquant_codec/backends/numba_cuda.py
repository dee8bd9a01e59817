"""Numba CUDA backend: straightforward reference kernels for the GPU (and Numba's CUDA simulator).

Layout owned here
-----------------
Inputs are viewed as 2-D row arrays: ``x`` (*lead, n, d) -> (rows, d), records -> (rows, record_bytes);
row ``r`` belongs to stream ``r // rows_per_stream`` (its channel permutation). bfloat16 inputs travel
as their uint16 bit patterns (``asarray`` re-labels them; every float op widens them in-kernel).
On a GPU, arrays travel as ``numba_launch.DeviceView`` and kernels are launched by
``numba_launch.launch`` (Numba's own launch path costs more than the attention kernels run);
outputs come from cuda.core's stream-ordered pool.

Per configuration and device, ``_tables`` uploads float32 copies of the host tables of
``transforms.tables`` stacked over groups, ``(groups, g, g)``: ``rot`` (R), ``rot_t`` (R^T), ``proj``
(S), ``proj_t`` (S^T), plus centroids and boundaries padded to 16 entries, and an int32 ``meta``
row per group (byte offsets and code width). Every group of one configuration has the same ``g``.

The "extended rotated row" of a vector is the common currency of every kernel: ``W = d`` columns
``norm_g * centroid[code]`` (groups in record order) and, in prod mode, ``d`` more columns
``gamma_g * qjl_scale * (+-1)``. A decoded vector is ``(ext[:d] + ext[d:] @ S) @ R`` per group; a
score is ``ext . q_ext`` with ``q_ext = [q_rot, S q_rot]``, so keys are never decoded.

Kernels
-------
``numba_kernels`` holds the block kernels (one block per tile of rows or per attention split) and
``numba_warp_attention`` the warp-level decode attention built per configuration; this module is
the host side: tables, launch shapes, the ops.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _interop
from .._ops import Availability
from ..config import CodecConfig, norm_range_error
from ..encoded import Encoded
from ..transforms import tables as host_tables
from .occupancy import STATIC_SMEM_LIMIT, resident_blocks

try:  # numba-cuda must never break ``import turboquant_codec``: report the failure instead.
    from numba import cuda

    from . import numba_kernels as nk
    from . import numba_launch
    from .numba_kernels import THREADS, VPT
    from .numba_launch import DeviceView
    from .numba_warp_attention import TILE, WARP, fast_attention_kernel

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the installed numpy/numba pair
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Codebooks have at most 2**4 centroids (4 code bits); tables are padded to this width.
MAX_CENTROIDS = 16
# Attention blocks wanted per KV stream batch: a few per SM of an H100 (132 SMs) hides latency.
TARGET_BLOCKS = 4 * 132
# Key tiles of the block attention kernel: one warp-width of keys per step when shared memory allows.
KEY_TILES = (32, 16, 8)
# Resident warps per SM the warp attention's split count aims at.
WARPS_PER_SM = 32
# 32-bit registers per SM (every compute capability from 5.0 on).
SM_REGS = 65536


def _simulated() -> bool:
    """Whether Numba runs kernels in its CUDA simulator (NUMBA_ENABLE_CUDASIM=1 at import)."""
    return numba_launch.simulated()


def _view(x: Any) -> Any:
    """A GPU array as kernels here take it: a ``DeviceView`` (the simulator's own arrays there)."""
    return x if x is None or _simulated() else DeviceView.of(x)


def _empty(shape: tuple[int, ...], dtype: Any, device: int) -> Any:
    """A new output array on ``device`` (stream-ordered pool memory; Numba's arrays in the simulator)."""
    if _simulated():
        return cuda.device_array(shape, dtype)
    return numba_launch.empty(shape, dtype, device)


def availability() -> Availability:
    """Whether Numba CUDA can run here, with the reason when it cannot."""
    if _IMPORT_ERROR is not None:
        return Availability(False, f"numba-cuda failed to import: {_IMPORT_ERROR}")
    if _simulated():
        return Availability(True, "CUDA simulator")
    try:
        if not cuda.is_available():
            return Availability(False, "no CUDA driver: numba.cuda.is_available() is False")
        name = cuda.get_current_device().name
        return Availability(True, name.decode() if isinstance(name, bytes) else str(name))
    except Exception as exc:
        return Availability(False, f"no CUDA driver: {type(exc).__name__}: {exc}")


def asarray(x: Any) -> Any:
    """A GPU array over ``x``: zero-copy for GPU arrays, a device copy for host arrays.

    On a GPU, C-contiguous arrays come back as ``numba_launch.DeviceView`` (a pointer, shape and
    dtype: cheap to make and to launch with), strided ones and host copies as Numba device arrays
    (the paged ops write through strided cache views in place); under the simulator, as its device
    arrays, its own ones as they are. bfloat16 (``__cuda_array_interface__`` typestr ``<V2``, or
    ml_dtypes on the host) comes back as uint16 of the same bits, which every kernel here reads as
    bfloat16.
    """
    if _simulated() and hasattr(x, "copy_to_host"):
        return x  # the simulator's own device arrays (no array interface): in-place writes must land
    iface = getattr(x, "__cuda_array_interface__", None)  # a property: torch builds it per read
    if iface is not None:
        if not _simulated():
            try:
                return DeviceView.of(x, iface)
            except ValueError:  # strided views (a paged cache's K/V halves) keep their strides
                pass
        if iface["typestr"] in ("<V2", "|V2"):
            return cuda.as_cuda_array(_Relabelled(iface, "<u2"))
        return cuda.as_cuda_array(x)
    host = np.ascontiguousarray(np.asarray(x))
    if host.dtype.kind == "V" or host.dtype.name == "bfloat16":
        host = host.view(np.uint16)
    return cuda.to_device(host)


class _Relabelled:
    """A CUDA array interface re-labelled with another dtype of the same size (bfloat16 -> uint16)."""

    def __init__(self, iface: dict[str, Any], typestr: str) -> None:
        self.__cuda_array_interface__ = {**iface, "typestr": typestr, "descr": [("", typestr)]}


@dataclass(frozen=True)
class _Tables:
    """Device copies of one configuration's tables (see the module docstring)."""

    rot: Any
    rot_t: Any
    proj: Any
    proj_t: Any
    cent: Any
    bnd: Any
    meta: Any
    g: int
    ngroups: int
    qjl: bool
    qjl_scale: float

    def width(self, d: int) -> int:
        """Columns of an extended rotated row."""
        return 2 * d if self.qjl else d


def _upload(host: np.ndarray) -> Any:
    return _view(cuda.to_device(np.ascontiguousarray(host)))


def _stack(mats: list[np.ndarray]) -> Any:
    return _upload(np.stack(mats).astype(np.float32))


@functools.lru_cache(maxsize=128)
def _device_tables(cfg: CodecConfig, device: int) -> _Tables:
    """Upload the host tables of ``cfg`` to GPU ``device`` once (the caller holds its context)."""
    host = host_tables(cfg)
    groups = cfg.groups
    cent = np.zeros((len(groups), MAX_CENTROIDS), np.float32)
    bnd = np.full((len(groups), MAX_CENTROIDS), np.inf, np.float32)
    meta = np.zeros((len(groups), 8), np.int32)
    for i, (grp, tab) in enumerate(zip(groups, host, strict=True)):
        cent[i, : tab.centroids.size] = tab.centroids
        bnd[i, : tab.boundaries.size] = tab.boundaries
        meta[i, :5] = (grp.code_offset, grp.code_bits, max(grp.sign_offset, 0), grp.norm_offset,
                       tab.boundaries.size)
    qjl = cfg.mode == "prod"
    proj = [t.projection if t.projection is not None else np.zeros((1, 1)) for t in host]
    return _Tables(
        rot=_stack([t.rotation for t in host]),
        rot_t=_stack([t.rotation.T for t in host]),
        proj=_stack(proj),
        proj_t=_stack([p.T for p in proj]),
        cent=_upload(cent),
        bnd=_upload(bnd),
        meta=_upload(meta),
        g=groups[0].dim,
        ngroups=len(groups),
        qjl=qjl,
        qjl_scale=host[0].qjl_scale,
    )


def _device_id(arr: Any) -> int:
    """Ordinal of the GPU holding ``arr`` (the current device under the simulator, for None, or for
    an array without memory).

    Asked of the array's library where it knows (torch, CuPy, cuda.core buffers): on a 2-GPU H200
    host, ``cuPointerGetAttribute(DEVICE_ORDINAL)`` answered 0 for a torch tensor on cuda:1.
    """
    if _simulated() or arr is None:
        return 0 if _simulated() else int(cuda.get_current_device().id)
    if _gpu_count() == 1:
        return 0
    owner = arr.owner if isinstance(arr, DeviceView) else arr
    lib = _interop.library_of(owner)
    if lib == "torch":
        return int(owner.device.index)
    if lib == "cupy":
        return int(owner.device.id)
    if hasattr(owner, "device_id"):  # a cuda.core Buffer: this backend's outputs
        return int(owner.device_id)
    ptr = arr.ptr if isinstance(arr, DeviceView) else arr.__cuda_array_interface__["data"][0]
    ordinal = numba_launch.device_of(ptr)
    return int(cuda.get_current_device().id) if ordinal is None else ordinal


@functools.cache
def _gpu_count() -> int:
    return len(cuda.gpus)


class _on_device:
    """Context manager: make the GPU holding ``arr`` current, so kernels and outputs live there."""

    def __init__(self, arr: Any) -> None:
        self.id = _device_id(arr)
        self._ctx: Any = None

    def __enter__(self) -> int:
        if not _simulated():
            self._ctx = cuda.gpus[self.id]
            self._ctx.__enter__()
        return self.id

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def _rows(a: Any, cols: int) -> Any:
    """A C-contiguous device array viewed as (rows, cols)."""
    if not a.is_c_contiguous():
        raise ValueError("numba_cuda needs C-contiguous arrays; make a contiguous copy first")
    return a.reshape(math.prod(a.shape) // cols, cols)


@functools.cache
def _placeholder(dtype: str, cols: int, device: int) -> Any:
    """A zero (1, cols) device array standing in for an absent input (uploaded once per device)."""
    return _upload(np.zeros((1, cols), dtype))


def _channels(channels: Any, d: int, device: int) -> tuple[Any, bool]:
    """(streams, d) channel table, or a 1x1 placeholder when channels are in natural order."""
    if channels is None:
        return _placeholder("uint16", 1, device), False
    return _rows(channels, d), True


def _is_bf16(a: Any) -> bool:
    """uint16 inputs are bfloat16 bit patterns (see ``asarray``); float inputs are read as they are."""
    return bool(np.dtype(a.dtype) == np.uint16)


def _tile(per_row_floats: int, fixed_floats: int = 0, cap: int = 32) -> int:
    """Rows per block: a multiple of VPT, at most ``cap``, within STATIC_SMEM_LIMIT of float32 scratch."""
    rows = (STATIC_SMEM_LIMIT // 4 - fixed_floats) // per_row_floats
    rows = min(cap, rows) // VPT * VPT
    if rows < VPT:
        raise ValueError("head dimension too large for the numba_cuda backend's shared-memory tiles")
    return rows


def _launch(kernel: Any, device: int, blocks: Any, smem_floats: int, *args: Any) -> None:
    numba_launch.launch(kernel, device, blocks, THREADS, 4 * smem_floats, *args)


def _blocks(rows: int, tile: int) -> int:
    return -(-rows // tile)


# ---------------------------------------------------------------------------------- channel choice
# Vectors per energy partial sum: long enough to amortise a thread, short enough to fill the GPU.
ENERGY_CHUNK = 1024


def _select_channels(x2: Any, streams: int, n: int, cfg: CodecConfig, device: int) -> Any:
    """``numpy_ref.select_channels`` with the float64 sums on the GPU and the ranking on the host.

    Partial sums over fixed chunks are added on the host in a fixed order, so the choice is
    deterministic; ties go to the lower channel index exactly as in the reference.
    """
    d = cfg.d
    chunks = max(1, -(-n // ENERGY_CHUNK))
    partial = _empty((streams, chunks, d), np.float64, device)
    grid = (-(-d // THREADS), chunks, streams)
    numba_launch.launch(nk.energy_kernel, device, grid, THREADS, 0, x2, _is_bf16(x2), n, ENERGY_CHUNK,
                        partial)
    energy = numba_launch.to_host(partial, device).sum(axis=1) / n
    order = np.argsort(-energy, axis=-1, kind="stable")
    top = np.sort(order[:, : cfg.outlier_dim], axis=-1)
    rest = np.sort(order[:, cfg.outlier_dim :], axis=-1)
    return _upload(np.concatenate([top, rest], axis=-1).astype(np.uint16))


# --------------------------------------------------------------------------------------------- ops
def encode(x: Any, cfg: CodecConfig, channels: Any) -> tuple[Any, Any]:
    """Encode ``x`` (*lead, n, d) into byte records (*lead, n, record_bytes) uint8 on its GPU.

    Parameters
    ----------
    x : GPU array (``asarray``), float16/float32, or uint16 holding bfloat16
    cfg : CodecConfig
    channels : device array (*lead, d) uint16 or None
        None with half-integer bits: chosen per stream as ``numpy_ref.select_channels``.

    Returns
    -------
    records, channels : device arrays
    """
    x, channels = _view(x), _view(channels)
    *lead, n, d = x.shape
    streams = math.prod(lead)
    rows = streams * n
    with _on_device(x) as dev:
        rec = _empty((*lead, n, cfg.record_bytes), np.uint8, dev)
        if rows == 0:
            return rec, channels
        x2 = _rows(x, d)
        if cfg.split and channels is None:
            channels = _select_channels(x2, streams, n, cfg, dev).reshape(*lead, d)
        t = _device_tables(cfg, dev)
        chans, has_ch = _channels(channels, d, dev)
        tile = _tile(3 * d + 2 * t.ngroups)
        overflow = cuda.to_device(np.zeros(1, np.int32))
        _launch(nk.encode_kernel, dev, _blocks(rows, tile), tile * (3 * d + 2 * t.ngroups),
                x2, _is_bf16(x2), chans, has_ch, n, _rows(rec, cfg.record_bytes), overflow, tile,
                t.rot_t, t.proj_t, t.cent, t.bnd, t.meta, t.g, t.ngroups, t.qjl)
        bad = int(numba_launch.to_host(overflow, dev)[0])
    if bad:
        raise norm_range_error(bad)
    return rec, channels


def decode(enc: Encoded) -> Any:
    """Reconstruct (*lead, n, d) float32 vectors from ``enc`` on the GPU holding its records.

    Parameters
    ----------
    enc : Encoded
        Records and channels as GPU arrays (``asarray``).

    Returns
    -------
    DeviceView (Numba device array under the simulator), float32
    """
    cfg = enc.config
    records, channels = _view(enc.records), _view(enc.channels)
    *lead, n, _ = records.shape
    d = cfg.d
    with _on_device(records) as dev:
        out = _empty((*lead, n, d), np.float32, dev)
        rows = math.prod(lead) * n
        if rows == 0:
            return out
        t = _device_tables(cfg, dev)
        chans, has_ch = _channels(channels, d, dev)
        per_row = t.width(d) + d
        tile = _tile(per_row)
        _launch(nk.decode_kernel, dev, _blocks(rows, tile), tile * per_row,
                _rows(records, cfg.record_bytes), chans, has_ch, n, _rows(out, d), tile,
                t.rot, t.proj, t.cent, t.meta, t.g, t.qjl, t.qjl_scale)
    return out


def _rotate_queries(q2: Any, channels: Any, per_stream: int, cfg: CodecConfig, t: _Tables,
                    device: int) -> Any:
    """(rows, W) float32 queries in the keys' extended rotated domain (one pass per query)."""
    d = cfg.d
    width = t.width(d)
    out = _empty((q2.shape[0], width), np.float32, device)
    chans, has_ch = _channels(channels, d, device)
    per_row = d + width
    tile = _tile(per_row, cap=VPT)  # few rows: one tile of VPT rows per block spreads them out
    _launch(nk.query_kernel, device, _blocks(q2.shape[0], tile), tile * per_row,
            q2, _is_bf16(q2), chans, has_ch, per_stream, out, tile, t.rot_t, t.proj_t, t.g, t.qjl)
    return out


def scores(q: Any, keys: Encoded) -> Any:
    """Estimated ``<q_i, k_j>`` (*lead, m, n) float32, from the codes (keys are never decoded).

    Parameters
    ----------
    q : GPU array (*lead, m, d)
    keys : Encoded (*lead, n, d)

    Returns
    -------
    DeviceView (Numba device array under the simulator), float32
    """
    cfg = keys.config
    q, records, channels = _view(q), _view(keys.records), _view(keys.channels)
    *lead, m, d = q.shape
    n = tuple(records.shape)[-2]
    streams = math.prod(lead)
    with _on_device(records) as dev:
        out = _empty((*lead, m, n), np.float32, dev)
        if streams * m * n == 0:
            return out
        t = _device_tables(cfg, dev)
        qext = _rotate_queries(_rows(q, d), channels, m, cfg, t, dev)
        width = t.width(d)
        tile = _tile(width + 1)
        _launch(nk.scores_kernel, dev, (_blocks(n, tile), streams), tile * (width + 1),
                qext, _rows(records, cfg.record_bytes), out.reshape(streams, m, n), tile, d,
                t.cent, t.meta, t.g, t.qjl_scale)
    return out


def _splits(tokens: int, streams: int, split_tokens: int | None, tk: int) -> tuple[int, int]:
    """(splits, tokens per split): enough blocks to fill the GPU, whole key tiles per split."""
    if split_tokens is None:
        want = max(1, -(-TARGET_BLOCKS // max(streams, 1)))
        split_tokens = -(-tokens // want)
    chunk = max(tk, -(-split_tokens // tk) * tk)
    return max(1, -(-tokens // chunk)), chunk


@functools.cache
def _sm_count(device: int) -> int:
    return 132 if _simulated() else int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def _resident_warps(regs: int | None, warps: int, device: int) -> int:
    """Warps of a kernel using ``regs`` registers per thread the GPU holds at once, in blocks of
    ``warps``, at most ``WARPS_PER_SM`` per SM, for the split count (the simulator's answer: an
    H100's 132 SMs at ``WARPS_PER_SM``)."""
    if regs is None:
        return 132 * WARPS_PER_SM
    # Shared memory does not bound it: the warp attention keeps its tiles in registers, so its blocks
    # ask for none, and STATIC_SMEM_LIMIT merely stands in for the SM's shared memory.
    blocks = resident_blocks(regs, 0, warps * WARP, SM_REGS, STATIC_SMEM_LIMIT, WARPS_PER_SM * WARP)
    return _sm_count(device) * blocks * warps


@functools.lru_cache(maxsize=32)
def _scratch(rows: int, nsp: int, width: int, device: int, stream: int) -> tuple[Any, Any, Any]:
    """Split partials (max, sum, accumulator), reused across calls on one stream (which orders them)."""
    return (_empty((rows, nsp), np.float32, device), _empty((rows, nsp), np.float32, device),
            _empty((rows, nsp, width), np.float32, device))


def attention(
    q: Any,
    k: Encoded,
    v: Encoded,
    scale: float,
    k_tail: Any,
    v_tail: Any,
    split_tokens: int | None = None,
) -> Any:
    """Decode attention over compressed K/V plus an optional raw tail, GQA by head groups.

    Parameters
    ----------
    q : GPU array (*lead, h_q, d)
    k, v : Encoded (*lead, h_kv, n, d)
    scale : float
    k_tail, v_tail : GPU arrays (*lead, h_kv, t, d) or None
    split_tokens : int, optional
        Tokens per split of the sequence (rounded up to whole key tiles); by default enough splits
        to fill the GPU twice over.

    Returns
    -------
    DeviceView (Numba device array under the simulator) (*lead, h_q, d), float32
    """
    q, krec, vrec = _view(q), _view(k.records), _view(v.records)
    k_tail, v_tail = _view(k_tail), _view(v_tail)
    *lead, h_q, d = q.shape
    h_kv, n = tuple(krec.shape)[-3:-1]
    groups = h_q // h_kv
    batch = math.prod(lead)
    t = 0 if k_tail is None else int(tuple(k_tail.shape)[-2])
    with _on_device(krec) as dev:
        out = _empty((*lead, h_q, d), np.float32, dev)
        rows = batch * h_q
        if rows == 0:
            return out
        kt, vt = _device_tables(k.config, dev), _device_tables(v.config, dev)
        wk, wv = kt.width(d), vt.width(d)
        q2 = _rows(q, d)
        qext = _rotate_queries(q2, _view(k.channels), groups, k.config, kt, dev)
        streams = batch * h_kv
        fixed = groups * (wk + wv + 3)
        tk = next((s for s in KEY_TILES if fixed + s * (wk + wv + 2 + groups) <= STATIC_SMEM_LIMIT // 4), 0)
        fast = fast_attention_kernel(k.config, v.config, groups)
        if fast is None and tk == 0:
            raise ValueError("too many query heads per KV head for the numba_cuda attention tiles")
        krec, vrec = _rows(krec, k.config.record_bytes), _rows(vrec, v.config.record_bytes)
        if fast is not None:
            kernel, warps = fast
            kw = krec.reshape(krec.size).view(np.uint32)
            vw = vrec.reshape(vrec.size).view(np.uint32)
            if split_tokens is None:
                # Registers depend on argument types only: 1-element placeholders stand in for the
                # partials, whose shape waits on the split count chosen here.
                p2 = _placeholder("float32", 1, dev)
                regs = numba_launch.registers(kernel, dev, qext, kw, vw, n, 0, 0, np.float32(scale),
                                              kt.cent, vt.cent, p2, p2, p2.reshape(1, 1, 1))
                want = -(-2 * _resident_warps(regs, warps, dev) // max(streams, 1))
                split_tokens = -(-n // max(want, 1))
            nsplit, chunk = _splits(n, streams, split_tokens, TILE)
        else:
            nsplit, chunk = _splits(n, streams, split_tokens, tk)
        nsp = nsplit + (1 if t else 0)
        m_part, l_part, acc_part = _scratch(rows, nsp, max(wv, d), dev, _interop.current_stream(dev))
        if t:
            ktail2, vtail2 = _rows(k_tail, d), _rows(v_tail, d)
        else:
            ktail2 = vtail2 = _placeholder("float32", d, dev)
        if fast is not None:
            numba_launch.launch(kernel, dev, (-(-nsplit // warps), streams), warps * WARP, 0,
                                qext, kw, vw, n, chunk, nsplit, np.float32(scale), kt.cent, vt.cent,
                                m_part, l_part, acc_part)
        if fast is None or t:
            first = nsplit if fast is not None else 0
            smem = fixed + tk * (wk + wv + 2 + groups)
            _launch(nk.attention_kernel, dev, (nsp - first, h_kv, batch), smem,
                    qext, q2, _is_bf16(q2), krec, vrec, ktail2, vtail2, _is_bf16(ktail2), n, t, chunk,
                    nsplit, first, groups, np.float32(scale), tk, d, wk, wv,
                    kt.cent, kt.meta, kt.g, kt.qjl_scale, vt.cent, vt.meta, vt.g, vt.qjl_scale,
                    m_part, l_part, acc_part)
        chans, has_ch = _channels(_view(v.channels), d, dev)
        _launch(nk.combine_rows_kernel, dev, rows, nsp + 1 + wv + d,
                m_part, l_part, acc_part, nsplit, chans, has_ch, groups, _rows(out, d),
                vt.rot, vt.proj, vt.g, vt.qjl)
    return out


# ---------------------------------------------------------------------------------------- paged ops
def paged_write(cache: Any, key: Any, value: Any, slot_mapping: Any) -> tuple[Any, Any]:
    """The op contract's ``paged_write``: see ``numba_paged.paged_write`` (imported here lazily, as
    it builds on this module)."""
    from . import numba_paged

    return numba_paged.paged_write(cache, key, value, slot_mapping)


def paged_attention(cache: Any, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                    query_start_loc: Any, scale: float, out: Any, num_decodes: int | None) -> Any:
    """The op contract's ``paged_attention``: see ``numba_paged.paged_attention``."""
    from . import numba_paged

    return numba_paged.paged_attention(cache, query, key, value, block_table, seq_lens, query_start_loc,
                                       scale, out, num_decodes)
