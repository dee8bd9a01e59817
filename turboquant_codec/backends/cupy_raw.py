"""CuPy RawModule backend: tuned CUDA C++ kernels (``backends/cuda/*.cu``) for every op.

Its jobs, one module each:

- ``cupy_raw_device``: availability, CuPy (imported on first use), device attributes.
- ``cupy_raw_build``: NVRTC compilation of the ``.cu`` files and the ``-D`` options they take.
- ``cupy_raw_tables``: the per-configuration tables the kernels read, laid out and uploaded once.
- ``cupy_raw_tc``: the tensor-core encode's fragment tables and launch shape.
- ``cupy_raw_attn``: the fused attention's shared-memory layouts, ring depth and split planning.
- this module: the ops (encode, decode, scores, attention and its replay; the paged ops are
  ``cupy_paged``'s), the arrays they take, the streams they launch on, and the launch plans kept
  per configuration.

Layout owned here
-----------------
- Inputs: CuPy arrays, torch CUDA tensors and Numba device arrays are used in place
  (``__cuda_array_interface__`` / DLPack, or a view of a plain torch tensor's pointer), on their own
  device; bfloat16 travels as raw 16-bit words (``_Raw16``).
- Streams: launches go to CuPy's current stream, or torch's current stream when torch is in use and
  CuPy's is the default one, so the attention path can be captured in either library's CUDA graph.
- Attention is three launches and no host synchronisation: query prep, the split kernel (one
  partial per warp-run of 16-token tiles), the reduce kernel (merge, tail tokens, un-rotation); its
  scratch (prep outputs and partials) is one allocation carved at ``_AttentionLayout.offsets``.

Record layout and math: exactly ``numpy_ref`` (see ``turboquant_codec.config``), in float32 on the GPU,
with float64 norms; codes may differ from the float64 reference only where a value lies on a
codebook boundary to float32 rounding. The tensor-core encode (``tq_encode_tc``) rotates with split
16-bit products (~17 bits for bfloat16 input, ~22 otherwise) and float32 norms: its codes differ on
up to ~1e-5 of coordinates (the tests allow 1e-4), its norms by one bfloat16 step at most (rounded
from float32). Tuning: ``turboquant_codec.tuning.CupyRawTuning``.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _interop
from .. import tuning as _tuning
from ..config import CodecConfig
from ..encoded import Encoded
from ..tuning import CupyRawTuning
from . import cupy_raw_attn as _attn
from . import cupy_raw_build as _build
from . import cupy_raw_device as _device
from . import cupy_raw_tables as _tables
from . import cupy_raw_tc
from .cupy_raw_device import availability
from .cupy_raw_device import cupy as _cupy
from .occupancy import STATIC_SMEM_LIMIT, resident_blocks

__all__ = ["asarray", "attention", "attention_replay", "availability", "decode", "encode", "paged_attention",
           "paged_attention_replay", "paged_write", "scores"]

# Encode kernel tiling (mirrors ENC_THREADS / ENC_TV in tq_codec.cu).
ENC_THREADS = 256
ENC_TV, ENC_TV_PROD = 32, 16
# Null device pointer argument (8 bytes, as the kernels expect a pointer).
_NULL = np.uint64(0)


class _Raw16:
    """A bfloat16 array CuPy cannot type: its raw 16-bit words plus the dtype name."""

    def __init__(self, words: Any, dtype: str) -> None:
        self.words = words
        self.dtype = dtype
        self.shape = tuple(words.shape)


def asarray(x: Any) -> Any:
    """A CuPy view of a GPU array (zero-copy), or a ``_Raw16`` view of bfloat16 data.

    Parameters
    ----------
    x : CuPy array, torch CUDA tensor, Numba device array or NumPy array

    Returns
    -------
    cupy.ndarray or _Raw16
        On the input's own device; NumPy input is copied to the current device.
    """
    cp = _cupy()
    if isinstance(x, (cp.ndarray, _Raw16)):
        return x
    if type(x).__module__.split(".")[0] == "torch":
        view = _torch_view(x)
        if view is not None:
            return view
        torch = sys.modules["torch"]
        with cp.cuda.Device(x.device.index):
            if x.dtype == torch.bfloat16:
                return _Raw16(cp.asarray(x.view(torch.int16)).view(cp.uint16), "bfloat16")
            return cp.asarray(x)
    if isinstance(x, np.ndarray) and x.dtype.name == "bfloat16":
        return _Raw16(cp.asarray(x.view(np.uint16)), "bfloat16")
    return cp.asarray(x)


# torch dtype -> (NumPy dtype of the CuPy view, whether it is bfloat16 carried as raw words); filled
# on first use, so that importing this module does not import torch.
_TORCH_VIEW_DTYPES: dict[Any, tuple[np.dtype, bool]] = {}


def _torch_view(x: Any) -> Any:
    """The CuPy view ``asarray`` returns for a plain, contiguous, non-empty torch CUDA tensor that
    needs no gradient, made from its data pointer; None for any other tensor (``asarray`` then goes
    through ``__cuda_array_interface__`` as before, with its errors).

    ``cupy.asarray`` reads torch's ``__cuda_array_interface__``, a Python property that rebuilds a
    dict on every read, then asks the driver which device owns the pointer: most of the host time of
    a small call. The view made here is the same one: same pointer, shape, dtype and device, and it
    keeps ``x`` alive as its owner.
    """
    torch = sys.modules["torch"]
    if type(x) is not torch.Tensor or not x.is_cuda or x.requires_grad or not x.is_contiguous():
        return None
    if not _TORCH_VIEW_DTYPES:
        for name in ("float32", "float16", "uint8", "int8", "int16", "int32", "int64", "float64"):
            _TORCH_VIEW_DTYPES[getattr(torch, name)] = (np.dtype(name), False)
        if hasattr(torch, "uint16"):  # channel permutations; torch >= 2.3
            _TORCH_VIEW_DTYPES[torch.uint16] = (np.dtype(np.uint16), False)
        _TORCH_VIEW_DTYPES[torch.bfloat16] = (np.dtype(np.uint16), True)
    kind = _TORCH_VIEW_DTYPES.get(x.dtype)
    numel = x.numel()
    if kind is None or numel == 0:
        return None
    cp = _cupy()
    dtype, raw16 = kind
    mem = cp.cuda.UnownedMemory(x.data_ptr(), numel * dtype.itemsize, x, x.get_device())
    view = cp.ndarray(tuple(x.shape), dtype, cp.cuda.MemoryPointer(mem, 0))
    return _Raw16(view, "bfloat16") if raw16 else view


def _words(x: Any) -> tuple[Any, str]:
    """(C-contiguous CuPy array of the data, dtype name)."""
    cp = _cupy()
    if isinstance(x, _Raw16):
        return cp.ascontiguousarray(x.words), x.dtype
    name = str(x.dtype)
    if name == "bfloat16":  # CuPy builds that know bfloat16
        return cp.ascontiguousarray(x.view(cp.uint16)), name
    return cp.ascontiguousarray(x), name


def _aligned(a: Any) -> Any:
    """C-contiguous, 16-byte aligned (the attention kernel copies 16-byte chunks)."""
    cp = _cupy()
    a = cp.ascontiguousarray(a)
    if a.data.ptr % 16:
        a = a.copy()
    return a


def _array_device(x: Any) -> int:
    if isinstance(x, _Raw16):
        x = x.words
    return int(x.data.device_id)


def _stream(device: int) -> Any:
    """The caller's current stream (``_interop.current_stream``): CuPy's current stream, or torch's
    when CuPy's is the default and torch is in use."""
    cp = _cupy()
    current = cp.cuda.get_current_stream(device)
    if current.ptr != 0:
        return current
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # initialised: available too
        ptr = _interop.torch_stream(torch, device)
        if ptr != 0:
            return _external_stream(ptr, device)
    return current


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, device: int) -> Any:
    """CuPy's wrapper of a torch stream (a handle only: reusing it for a recycled pointer is safe)."""
    return _cupy().cuda.ExternalStream(ptr, device)


@dataclass(frozen=True)
class _TcPlan:
    """Everything an encode launch of tq_encode_tc needs besides its arrays, worked out once."""

    fn: Any  # the kernel
    table: Any  # its fragment tables and grids on the device
    smem: int  # dynamic shared memory per block
    blocks: int  # resident blocks on the whole device: the persistent grid
    warps: int  # per block
    vectors: int  # per warp tile


@functools.cache
def _tc_plan(device: int, cfg: CodecConfig, dtype: str, tuning: CupyRawTuning) -> _TcPlan:
    """The encode plan under ``tuning`` (a changed setting plans anew)."""
    wgmma, warps, mt = _build.tc_launch(device, cfg, dtype, tuning)
    fn = _build.codec_build(device, cfg, dtype, wgmma, warps, mt).get_function("tq_encode_tc")
    smem = cupy_raw_tc.encode_smem(cfg, dtype, warps, mt)
    attrs = _cupy().cuda.Device(device).attributes
    per_sm = resident_blocks(int(fn.num_regs), int(fn.shared_size_bytes) + smem, 32 * warps,
                             attrs["MaxRegistersPerMultiprocessor"],
                             attrs["MaxSharedMemoryPerMultiprocessor"],
                             attrs["MaxThreadsPerMultiProcessor"])
    table = _tables.device_tc_table(device, cfg, dtype, wgmma)
    return _TcPlan(fn, table, smem, per_sm * _device.sm_count(device), warps, 16 * mt)


def _encode_tc(xw: Any, dtype: str, cfg: CodecConfig, ch: Any, n: int, streams: int, rec: Any,
               device: int, tuning: CupyRawTuning | None = None) -> None:
    plan = _tc_plan(device, cfg, dtype, tuning or _tuning.current().cupy_raw)
    tiles = streams * -(-n // plan.vectors)
    grid = max(1, min(plan.blocks, -(-tiles // plan.warps)))
    if ch is not None and ch.data.ptr % 16:
        ch = ch.copy()
    plan.fn((grid,), (32 * plan.warps,),
            (xw, ch if ch is not None else _NULL, np.int32(n), np.int32(streams), plan.table, rec),
            shared_mem=plan.smem)


def select_channels(x: Any, cfg: CodecConfig, dtype: str, tuning: CupyRawTuning | None = None) -> Any:
    """GPU twin of ``numpy_ref.select_channels``: (*lead, d) uint16, no host synchronisation.

    Mean squares are summed in float64; ranks break ties towards the lower channel index.
    """
    cp = _cupy()
    *lead, n, d = x.shape
    streams = math.prod(lead)
    device = int(x.device.id)
    mod = _build.codec_module(device, cfg, dtype, tuning)
    energy = cp.zeros((streams, d), cp.float64)
    chunk = max(64, -(-n // max(1, (4 * _device.sm_count(device)) // max(1, streams * -(-d // 32)))))
    grid = (streams, -(-d // 32), -(-n // chunk))
    mod.get_function("tq_energy")(grid, (32, 8), (x, np.int32(n), np.int32(chunk), energy))
    # rank[i] = #channels before i in (energy descending, index ascending) order.
    e_i, e_j = energy[:, :, None], energy[:, None, :]
    idx = cp.arange(d)
    ahead = (e_j > e_i) | ((e_j == e_i) & (idx[None, None, :] < idx[None, :, None]))
    top = ahead.sum(-1) < cfg.outlier_dim
    pos = cp.where(top, cp.cumsum(top, -1) - 1, cfg.outlier_dim + cp.cumsum(~top, -1) - 1)
    channels = cp.empty((streams, d), cp.uint16)
    cp.put_along_axis(channels, pos, cp.broadcast_to(idx.astype(cp.uint16), (streams, d)), axis=-1)
    return channels.reshape(*lead, d)


def encode(x: Any, cfg: CodecConfig, channels: Any) -> tuple[Any, Any]:
    """Records (*lead, n, record_bytes) uint8 and channels, as ``numpy_ref.encode``.

    Parameters
    ----------
    x : cupy.ndarray or _Raw16, shape (*lead, n, d), float16/bfloat16/float32
    cfg : CodecConfig
    channels : cupy.ndarray (*lead, d) uint16 or None
        None with a channel split: chosen per stream as ``numpy_ref.select_channels``.
    """
    cp = _cupy()
    device = _array_device(x)
    tuning = _tuning.current().cupy_raw
    with cp.cuda.Device(device), _stream(device):
        xw, dtype = _words(x)
        *lead, n, d = xw.shape
        if cfg.split and channels is None:
            channels = select_channels(xw, cfg, dtype, tuning)
        rec = cp.empty((*lead, n, cfg.record_bytes), cp.uint8)
        ch = None if channels is None else cp.ascontiguousarray(channels, dtype=cp.uint16)
        if cupy_raw_tc.use_tc_encode(cfg, n, tuning) and xw.data.ptr % 16:  # cp.async reads 16-byte chunks
            xw = xw.copy()
        encode_into(xw.reshape(math.prod(lead), n, d), dtype, cfg, ch, rec, device, tuning)
        return rec, channels


def encode_into(xw: Any, dtype: str, cfg: CodecConfig, ch: Any, rec: Any, device: int,
                tuning: CupyRawTuning | None = None) -> None:
    """``encode``'s kernels into a given records buffer (no allocation), on the current stream.

    Parameters
    ----------
    xw : cupy.ndarray (streams, n, d), C-contiguous words of ``dtype``; 16-byte aligned when the
        tensor-core encode runs
    ch : cupy.ndarray (streams, d) uint16, C-contiguous, or None
    rec : cupy.ndarray (streams, n, record_bytes) uint8, written
    """
    tuning = tuning or _tuning.current().cupy_raw
    streams, n = int(xw.shape[0]), int(xw.shape[1])
    if cupy_raw_tc.use_tc_encode(cfg, n, tuning):
        _encode_tc(xw, dtype, cfg, ch, n, streams, rec, device, tuning)
        return
    tab, _ = _tables.device_tables(device, cfg)
    tv = ENC_TV_PROD if cfg.mode == "prod" else ENC_TV
    _build.codec_module(device, cfg, dtype, tuning).get_function("tq_encode")(
        (-(-n // tv), streams), (ENC_THREADS,), (xw, ch if ch is not None else _NULL, np.int32(n), tab, rec))


def decode(enc: Encoded) -> Any:
    """(*lead, n, d) float32 reconstruction, as ``numpy_ref.decode``."""
    cp = _cupy()
    records = enc.records
    device = int(records.device.id)
    cfg = enc.config
    with cp.cuda.Device(device), _stream(device):
        rec = cp.ascontiguousarray(records)
        *lead, n, _ = rec.shape
        streams = math.prod(lead)
        mod = _build.codec_module(device, cfg, "float32")
        tab, _ = _tables.device_tables(device, cfg)
        out = cp.empty((*lead, n, cfg.d), cp.float32)
        ch = None if enc.channels is None else cp.ascontiguousarray(enc.channels, dtype=cp.uint16)
        args = (rec, ch if ch is not None else _NULL, np.int32(n), tab, out)
        mod.get_function("tq_decode")((-(-n // _attn.TILE), streams), (128,), args)
        return out


def scores(q: Any, keys: Encoded) -> Any:
    """(*lead, m, n) float32 inner products from the codes, as ``numpy_ref.scores``."""
    cp = _cupy()
    device = _array_device(q)
    cfg = keys.config
    with cp.cuda.Device(device), _stream(device):
        qw, dtype = _words(q)
        rec = cp.ascontiguousarray(keys.records)
        *lead, m, d = qw.shape
        n = rec.shape[-2]
        streams = math.prod(lead)
        mod = _build.codec_module(device, cfg, dtype)
        tab, _ = _tables.device_tables(device, cfg)
        ch = None if keys.channels is None else cp.ascontiguousarray(keys.channels, dtype=cp.uint16)
        qf = cp.empty((streams * m, _tables.fdims(cfg)), cp.float32)
        mod.get_function("tq_qrot")(
            (streams * m,), (128,), (qw, ch if ch is not None else _NULL, np.int32(m), tab, qf)
        )
        out = cp.empty((*lead, m, n), cp.float32)
        mod.get_function("tq_scores")(
            (-(-n // _attn.TILE), streams), (128,), (rec, qf, np.int32(n), np.int32(m), tab, out)
        )
        return out


@dataclass(frozen=True, eq=False)
class _AttentionLaunch:
    """The kernels of one attention configuration with their shared-memory sizes and tables, built
    once: a call then only looks up its split (``_AttentionLayout``), allocates and launches.

    ``prep``, ``split`` and ``reduce`` are the driver functions of the device the launch was built
    for (a ``RawKernel`` looks its function up per call, by the current device); ``table_args`` are
    the tables as launch arguments (``_pointer_arg``), ``tables`` keeps them alive; ``tuning``: the
    settings it was built for."""

    tuning: CupyRawTuning
    prep: Any
    split: Any
    reduce: Any
    split_smem: int
    tables: tuple[Any, Any, Any, Any]  # K table buffer, K pair tables, V table buffer, V pair tables
    table_args: tuple[Any, Any, Any, Any]
    layouts: dict[tuple[int, int], _AttentionLayout] = field(default_factory=dict)


@dataclass(frozen=True)
class _AttentionLayout:
    """One call shape's split (``cupy_raw_attn.attention_plan``) and scratch: the byte offsets of the
    query prep's outputs and of the partials inside one allocation, and the launch arguments that
    depend only on the shape."""

    rows: int
    per_warp: int
    nparts: int
    nblocks: int
    offsets: tuple[int, ...]  # q32, qh, qscale, part_m, part_l, part_acc
    nbytes: int
    rows_grid: tuple[int]
    split_grid: tuple[int, int]
    split_block: tuple[int]
    reduce_smem: int
    ints: tuple[Any, Any, Any, Any]  # n, per_warp, nparts, nblocks: int32 arguments (``_by_value``)


# Shapes whose layout a launch keeps (a decode loop's n grows every step; past this the dict starts over).
_MAX_LAYOUTS = 256


# Scratch sub-buffers start on this boundary (as separate allocations would).
_SCRATCH_ALIGN = 256


def _attention_layout(plan: _AttentionLaunch, device: int, bh: int, n: int, d: int, group: int,
                      k_cfg: CodecConfig, v_cfg: CodecConfig) -> _AttentionLayout:
    layout = plan.layouts.get((bh, n))
    if layout is not None:
        return layout
    warps = plan.tuning.attn_warps
    per_warp, nparts = _attn.attention_plan(bh, n, device, plan.tuning) if n > 0 else (1, 0)
    nblocks = -(-nparts // warps)  # one partial per split block
    kqd, vqd = _tables.fdims(k_cfg), _tables.fdims(v_cfg)
    rows = bh * group
    parts = bh * max(nblocks, 1) * group
    sizes = (4 * rows * d, 2 * rows * 2 * kqd, 4 * rows, 4 * parts, 4 * parts, 4 * parts * vqd)
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    ints = tuple(_by_value(np.int32(v)) for v in (n, per_warp, nparts, nblocks))
    layout = _AttentionLayout(
        rows, per_warp, nparts, nblocks, tuple(offsets), at, (rows,), (nblocks, bh), (32 * warps,),
        _attn.reduce_smem(v_cfg, nblocks), ints,
    )
    if len(plan.layouts) >= _MAX_LAYOUTS:
        plan.layouts.clear()
    plan.layouts[(bh, n)] = layout
    return layout


@functools.lru_cache(maxsize=256)
def _attention_launch(device: int, k_cfg: CodecConfig, v_cfg: CodecConfig, dtype: str, tail_dtype: str,
                      group: int, tuning: CupyRawTuning) -> _AttentionLaunch:
    """``attention``'s kernels for one configuration under ``tuning`` (cached: looking them up and
    setting their attributes costs tens of microseconds of Python, as much as the kernels at small
    batches). Called with ``device`` current."""
    mod = _build.attention_module(device, k_cfg, v_cfg, dtype, tail_dtype, group, tuning)
    warps = tuning.attn_warps
    split_smem = max(_attn.split_smem(k_cfg, v_cfg, _attn.attention_stages(k_cfg, v_cfg, tuning), warps),
                     _attn.merge_smem(v_cfg, group, warps))
    split, reduce = mod.get_function("tq_attn_split"), mod.get_function("tq_attn_reduce")
    for fn, smem in ((split, split_smem), (reduce, _attn.reduce_smem(v_cfg, _attn.MAX_BLOCKS_PER_STREAM))):
        if smem > STATIC_SMEM_LIMIT:
            fn.max_dynamic_shared_size_bytes = max(smem, fn.max_dynamic_shared_size_bytes)
    tables = (*_tables.device_tables(device, k_cfg), *_tables.device_tables(device, v_cfg))
    return _AttentionLaunch(tuning, mod.get_function("tq_attn_prep").kernel, split.kernel, reduce.kernel,
                            split_smem, tables, tuple(_pointer_arg(t.data.ptr) for t in tables))


# CuPy turns every argument of every launch into a C value: an array into its pointer, a NumPy
# scalar into a new C scalar object. Arguments built once as CuPy's own C-value objects (CIntptr for
# a pointer, CNumpyArray for a value) are passed through as they are. Where CuPy lacks those
# classes, the plain values are used.
@functools.cache
def _arg_types() -> tuple[Any, Any] | None:
    try:
        from cupy.cuda.function import CIntptr, CNumpyArray
    except ImportError:
        return None
    return CIntptr, CNumpyArray


def _pointer_arg(ptr: int) -> Any:
    """Device pointer ``ptr`` as a launch argument (the memory must outlive the launch's enqueue)."""
    types = _arg_types()
    return np.uint64(ptr) if types is None else types[0](ptr)


def _by_value(value: np.generic) -> Any:
    """NumPy scalar ``value`` as a launch argument passed by value (its C type is ``value``'s)."""
    types = _arg_types()
    return value if types is None else types[1](np.array(value))


@functools.cache
def _null_arg() -> Any:
    """The null device pointer as a launch argument."""
    return _pointer_arg(0)


@functools.cache
def _no_tail_arg() -> Any:
    """Tail length 0 (int32) as a launch argument."""
    return _by_value(np.int32(0))

_SCALES: dict[float, Any] = {}


def _scale_arg(scale: float) -> Any:
    """float32 ``scale`` as a launch argument, kept per value (a decode loop uses one or two)."""
    arg = _SCALES.get(scale)
    if arg is None:
        if len(_SCALES) >= 64:
            _SCALES.clear()
        arg = _SCALES[scale] = _by_value(np.float32(scale))
    return arg


def _attention_operands(enc: Encoded) -> tuple[Any, Any]:
    """(records, channels) of ``enc`` as the attention kernels take them: records C-contiguous and
    16-byte aligned, channels C-contiguous uint16 or the null pointer.

    Where those are ``enc``'s own arrays (no copy needed), their pointer arguments are kept with
    ``enc`` (``Encoded._memo``): ``enc`` holds the arrays, so the pointers stay valid while the
    memo lives. A copy is made again at every call: the records may be written between calls.
    """
    memo = enc._memo()
    hit = memo.get("cupy_raw.attention")
    if hit is not None and hit[0] is enc.records and hit[1] is enc.channels:
        return hit[2], hit[3]
    cp = _cupy()
    rec = _aligned(enc.records)
    ch = None if enc.channels is None else cp.ascontiguousarray(enc.channels, dtype=cp.uint16)
    if rec is enc.records and ch is enc.channels:
        args = (_pointer_arg(rec.data.ptr), _null_arg() if ch is None else _pointer_arg(ch.data.ptr))
        memo["cupy_raw.attention"] = (enc.records, enc.channels, *args)
        return args
    return rec, _null_arg() if ch is None else ch


# One kernel launch: (kernel, grid, block, arguments, dynamic shared memory bytes).
_Call = tuple[Any, tuple[int, ...], tuple[int, ...], tuple[Any, ...], int]


def _attention_calls(plan: _AttentionLaunch, lay: _AttentionLayout, q: Any, records: tuple[Any, Any],
                     channels: tuple[Any, Any], tails: tuple[Any, Any], t_len: Any, scale: Any,
                     scratch: Sequence[Any], tables: Sequence[Any], ints: Sequence[Any],
                     out: Any) -> list[_Call]:
    """The kernel launches of one ``attention`` call, in order: prep, split (where the context has
    partials), reduce, each as ``cupy_launch.Launch``'s arguments (kernel, grid, block, args, dynamic
    shared memory). The one place that knows each kernel's argument order and launch shape.

    Arguments come in the form the caller launches with: ``attention`` passes CuPy launch arguments
    (arrays, its prebuilt pointer and value arguments) to CuPy's launcher, cheaper for one launch
    than packing driver parameters; ``attention_replay`` passes NumPy scalars (addresses as uint64)
    and packs each launch once (``cupy_launch.Launch``).

    Parameters
    ----------
    plan, lay : the configuration's kernels and the call shape's split and scratch layout
    q : query, [*lead, h_q, d]
    records : K, V records [*lead, h_kv, n, R]; channels : K, V channels [h_kv, d] or null
    tails : K, V tails [*lead, h_kv, t, d] or null; t_len : their t (int32)
    scale : float32
    scratch : q32, qh, qscale, part_m, part_l, part_acc (``lay.offsets`` into one buffer)
    tables : K table buffer, K pair tables, V table buffer, V pair tables (``plan.tables``)
    ints : n, per_warp, nparts, nblocks (int32; ``lay.ints``)
    out : [*lead, h_q, d] float32
    """
    q32, qh, qscale, part_m, part_l, part_acc = scratch
    ktab, klut, vtab, vlut = tables
    n32, per_warp32, nparts32, nblocks32 = ints
    calls: list[_Call] = [(plan.prep, lay.rows_grid, (128,),
                           (q, channels[0], ktab, scale, q32, qh, qscale), 0)]
    if lay.nparts:
        calls.append((plan.split, lay.split_grid, lay.split_block,
                      (*records, qh, qscale, klut, vlut, part_m, part_l, part_acc, n32, per_warp32, nparts32),
                      plan.split_smem))
    calls.append((plan.reduce, lay.rows_grid, (_attn.REDUCE_THREADS,),
                  (part_m, part_l, part_acc, nblocks32, q32, *tails, t_len, scale, vtab, channels[1], out),
                  lay.reduce_smem))
    return calls


def attention(
    q: Any,
    k: Encoded,
    v: Encoded,
    scale: float,
    k_tail: Any,
    v_tail: Any,
) -> Any:
    """Fused decode attention over compressed K/V plus raw tail tokens, as ``numpy_ref.attention``.

    Parameters
    ----------
    q : (*lead, h_q, d) float16/bfloat16/float32 on the GPU
    k, v : Encoded (*lead, h_kv, n, d)
    scale : float
    k_tail, v_tail : (*lead, h_kv, t, d) or None

    Returns
    -------
    cupy.ndarray (*lead, h_q, d) float32
        Launched asynchronously on the current stream (no host synchronisation).
    """
    cp = _cupy()
    device = _array_device(q)
    with cp.cuda.Device(device), _stream(device):
        qw, dtype = _words(q)
        q_shape = qw.shape
        h_q, d = q_shape[-2], q_shape[-1]
        rec_shape = k.records.shape  # (*lead, h_kv, n, record_bytes)
        h_kv, n = rec_shape[-3], rec_shape[-2]
        group = h_q // h_kv
        bh = qw.size // (h_q * d) * h_kv
        krec, kch = _attention_operands(k)
        vrec, vch = _attention_operands(v)
        null = _null_arg()
        if k_tail is not None:
            ktw, tail_dtype = _words(k_tail)
            vtw, _ = _words(v_tail)
            if str(vtw.dtype) != str(ktw.dtype):
                vtw = vtw.astype(ktw.dtype)
            t_len = np.int32(ktw.shape[-2])
        else:
            ktw = vtw = null
            tail_dtype, t_len = "float32", _no_tail_arg()
        settings = _tuning.current().cupy_raw
        plan = _attention_launch(device, k.config, v.config, dtype, tail_dtype, group, settings)
        lay = _attention_layout(plan, device, bh, n, d, group, k.config, v.config)
        # One allocation for the query prep's outputs and the partials (one pool call instead of six);
        # it returns to the pool, on this stream, when ``scratch`` goes.
        scratch = cp.cuda.alloc(lay.nbytes)
        base = scratch.ptr
        out = cp.ndarray(q_shape, cp.float32)
        for fn, grid, block, args, smem in _attention_calls(
                plan, lay, qw, (krec, vrec), (kch, vch), (ktw, vtw), t_len, _scale_arg(scale),
                [_pointer_arg(base + off) for off in lay.offsets], plan.table_args, lay.ints, out):
            fn(grid, block, args, smem)
        del scratch  # after the launches are queued (stream order keeps the pool's reuse behind them)
        return out


def attention_replay(q: Any, k: Encoded, v: Encoded, scale: float, k_tail: Any, v_tail: Any,
                     out: Any) -> Any:
    """A callable repeating ``attention(q, k, v, scale, k_tail, v_tail)`` into ``out``, holding no
    array: its three launches packed once (``cupy_launch``) on a scratch buffer kept for replays.

    Parameters
    ----------
    As ``attention``, and ``out``: (*lead, h_q, d) float32 C-contiguous CuPy array.

    Returns
    -------
    Callable[[], None] or None
        None where an operand would need a copy (not C-contiguous, misaligned records, tails of two
        dtypes) or ``out`` is not as above: such calls are not replayed. Replays share one scratch
        buffer per device: one caller stream per device at a time, as ``cupy_paged``.
    """
    from . import cupy_launch, cupy_paged

    cp = _cupy()
    qw = q.words if isinstance(q, _Raw16) else q
    tails = [] if k_tail is None else [t.words if isinstance(t, _Raw16) else t for t in (k_tail, v_tail)]
    arrays = [qw, *tails, out, k.records, v.records]
    if not all(isinstance(a, cp.ndarray) and a.flags.c_contiguous for a in arrays):
        return None
    if out.dtype != cp.float32 or out.shape != qw.shape or k.records.data.ptr % 16 or v.records.data.ptr % 16:
        return None
    channels = [e.channels for e in (k, v)]
    if any(c is not None and not (isinstance(c, cp.ndarray) and c.dtype == cp.uint16 and c.flags.c_contiguous)
           for c in channels):
        return None
    dtype = q.dtype if isinstance(q, _Raw16) else str(qw.dtype)
    if tails:
        tail_dtypes = {t.dtype if isinstance(t, _Raw16) else str(t.dtype) for t in (k_tail, v_tail)}
        if len(tail_dtypes) != 1:
            return None
        tail_dtype, t_len = tail_dtypes.pop(), np.int32(tails[0].shape[-2])
    else:
        tail_dtype, t_len = "float32", np.int32(0)
    device = int(qw.data.device_id)
    h_q, d = qw.shape[-2], qw.shape[-1]
    h_kv, n = k.records.shape[-3], k.records.shape[-2]
    group = h_q // h_kv
    settings = _tuning.current().cupy_raw
    with cp.cuda.Device(device):
        plan = _attention_launch(device, k.config, v.config, dtype, tail_dtype, group, settings)
        lay = _attention_layout(plan, device, qw.size // (h_q * d) * h_kv, n, d, group, k.config, v.config)
        base = cupy_paged._scratch(device, "attention-replay", lay.nbytes).data.ptr
    def ptr(a: Any) -> np.uint64:
        return np.uint64(0 if a is None else a.data.ptr)

    calls = _attention_calls(
        plan, lay, ptr(qw), (ptr(k.records), ptr(v.records)), (ptr(channels[0]), ptr(channels[1])),
        (ptr(tails[0]), ptr(tails[1])) if tails else (ptr(None), ptr(None)), t_len, np.float32(scale),
        [np.uint64(base + off) for off in lay.offsets], [ptr(t) for t in plan.tables],
        [np.int32(x) for x in (n, lay.per_warp, lay.nparts, lay.nblocks)], ptr(out))
    launches = tuple(cupy_launch.Launch(*call) for call in calls)
    return functools.partial(cupy_launch.on_device, device, cupy_launch.run_in_order, launches, device)


def paged_write(cache: Any, key: Any, value: Any, slot_mapping: Any) -> tuple[Any, Any]:
    """Encode and scatter new tokens into a paged cache: ``cupy_paged.paged_write``."""
    from . import cupy_paged

    return cupy_paged.paged_write(cache, key, value, slot_mapping)


def paged_attention(cache: Any, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                    query_start_loc: Any, scale: float, out: Any, num_decodes: int | None) -> Any:
    """Mixed decode/prefill attention over a paged cache: ``cupy_paged.paged_attention`` (the decode
    part one fused launch sequence)."""
    from . import cupy_paged

    return cupy_paged.paged_attention(cache, query, key, value, block_table, seq_lens, query_start_loc,
                                      scale, out, num_decodes)


def paged_attention_replay(cache: Any, query: Any, key: Any, value: Any, block_table: Any, seq_lens: Any,
                           query_start_loc: Any, scale: float, out: Any, num_decodes: int | None) -> Any:
    """The repeat of a paged_attention call just made, as a callable holding no array, or None:
    ``cupy_paged.paged_attention_replay``."""
    from . import cupy_paged

    return cupy_paged.paged_attention_replay(cache, query, key, value, block_table, seq_lens,
                                             query_start_loc, scale, out, num_decodes)
