"""CuPy RawModule backend: tuned CUDA C++ kernels (``backends/cuda/*.cu``) for every op.

What this module owns:

- Compilation: each ``.cu`` is compiled with NVRTC (``-std=c++17``) once per (device, kernel
  family, configuration); the configuration reaches the C++ as ``#define``\\ d constants (record
  layout, table offsets, dtype codes, query heads per KV head), so every loop over fields, k-steps
  and bits is unrolled at compile time. Modules are memoised per device, and CuPy caches the
  binaries on disk.
- Tables: per (device, config) one float32 buffer with, per channel group, the rotation, its
  transpose, the QJL projection and its transpose (prod), the centroids and the boundaries; plus
  the per-field value tables the attention kernel replicates into shared memory; and the
  tensor-core encode's fragment tables and code grids (laid out in ``cupy_raw_tc``). Uploaded once.
- Inputs: CuPy arrays, torch CUDA tensors and Numba device arrays are used in place
  (``__cuda_array_interface__`` / DLPack), on their own device; bfloat16 travels as raw 16-bit words.
  Launches go to CuPy's current stream, or torch's current stream when torch is in use and CuPy's
  is the default one, so the attention path can be captured in either library's CUDA graph.
- Attention is three launches and no host synchronisation: query prep, the split kernel (one
  partial per warp-run of 16-token tiles), the reduce kernel (merge, tail tokens, un-rotation).

Record layout and math: exactly ``numpy_ref`` (see ``turboquant_codec.config``), in float32 on the GPU,
with float64 norms; codes may differ from the float64 reference only where a value lies on a
codebook boundary to float32 rounding. The tensor-core encode (``tq_encode_tc``) rotates with split
16-bit products (~17 bits for bfloat16 input, ~22 otherwise) and float32 norms: its codes differ on
up to ~1e-5 of coordinates (the tests allow 1e-4), its norms within float16
rounding.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import tuning as _tuning
from .._ops import Availability
from ..config import CodecConfig
from ..encoded import Encoded
from ..transforms import tables
from ..tuning import CupyRawTuning
from . import cupy_raw_tc
from .occupancy import resident_blocks

CUDA_DIR = Path(__file__).with_name("cuda")
SOURCES = ("tq_codec.cu", "tq_attention.cu", "tq_paged.cu")  # tq_paged.cu: built by cupy_paged
# Headers the sources include, outermost first: tq_attn_common.cuh includes tq_common.cuh.
HEADERS = ("tq_attn_common.cuh", "tq_common.cuh")
_DTYPE_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}
# Launch shapes (warps, ring stages, tensor-core encode tiling, which encode runs) are settings:
# tuning.CupyRawTuning, read at each call and part of every build and plan cache key.
# Threads of tq_attn_reduce: its warps split a stream's partials (one per split block) and the
# un-rotation's rows.
REDUCE_THREADS = 256
# Opt-in shared memory per block on sm_90 (H100/H200).
SMEM_LIMIT = 227 * 1024
TILE = 16
# Encode kernel tiling (mirrors ENC_THREADS / ENC_TV in tq_codec.cu).
ENC_THREADS = 256
ENC_TV, ENC_TV_PROD = 32, 16
# Shared memory a block may opt into on sm_90 (227 KB); compile_options' default, where no device is
# at hand (tests/test_cuda_sources.py).
SM90_SMEM_OPTIN = 227 * 1024
# Null device pointer argument (8 bytes, as the kernels expect a pointer).
_NULL = np.uint64(0)


# ------------------------------------------------------------------------------------ availability
def availability() -> Availability:
    """Whether CuPy, a CUDA device and NVRTC are usable here; the reason when not."""
    try:
        import cupy
    except ImportError:
        return Availability(False, "cupy not installed")
    except Exception as exc:  # a broken install is a reason, not a crash
        return Availability(False, f"cupy failed to import: {type(exc).__name__}: {exc}")
    try:
        if not cupy.cuda.is_available():
            try:
                cupy.cuda.runtime.getDeviceCount()
                detail = "cupy.cuda.is_available() is False"
            except Exception as exc:
                detail = f"{type(exc).__name__}: {exc}"
            return Availability(False, f"no CUDA device: {detail}")
    except Exception as exc:
        return Availability(False, f"no CUDA device: {type(exc).__name__}: {exc}")
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:
        return Availability(False, f"NVRTC missing: {type(exc).__name__}: {exc}")
    return Availability(True)


def _cupy() -> Any:
    import cupy

    return cupy


# ------------------------------------------------------------------------------------ arrays
class _Raw16:
    """A bfloat16 array CuPy cannot type: its raw 16-bit words plus the dtype name."""

    def __init__(self, words: Any, dtype: str) -> None:
        self.words = words
        self.dtype = dtype
        self.shape = tuple(words.shape)


def _device_of(x: Any) -> int | None:
    if type(x).__module__.split(".")[0] == "torch":
        return int(x.device.index) if x.is_cuda else None
    return None


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
    """CuPy's current stream, or torch's when CuPy's is the default and torch is in use."""
    cp = _cupy()
    current = cp.cuda.get_current_stream(device)
    if current.ptr != 0:
        return current
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # initialised: available too
        ptr = _torch_stream_ptr(torch, device)
        if ptr != 0:
            return _external_stream(ptr, device)
    return current


def _torch_stream_ptr(torch: Any, device: int) -> int:
    """Handle of torch's current stream on ``device``.

    ``torch.cuda.current_stream`` builds a ``torch.cuda.Stream`` object (a device guard and a
    Python constructor) on every call, several microseconds; torch's own generated code reads the
    raw handle through ``torch._C._cuda_getCurrentRawStream`` instead, used here where it exists.
    """
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device))
    return int(torch.cuda.current_stream(device).cuda_stream)


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, device: int) -> Any:
    """CuPy's wrapper of a torch stream (a handle only: reusing it for a recycled pointer is safe)."""
    return _cupy().cuda.ExternalStream(ptr, device)


# ------------------------------------------------------------------------------------ tables
@functools.cache
def _layout(cfg: CodecConfig) -> tuple[np.ndarray, dict[str, int]]:
    """Host float32 table buffer of ``cfg`` and the float offsets of its parts (macro names)."""
    parts: list[np.ndarray] = []
    offsets: dict[str, int] = {}
    at = 0

    def put(name: str, a: np.ndarray) -> None:
        nonlocal at
        a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
        pad = (-a.size) % 4  # keep each part 16-byte aligned
        offsets[name] = at
        parts.append(np.concatenate([a, np.zeros(pad, np.float32)]))
        at += a.size + pad

    for g, t in zip(cfg.groups, tables(cfg), strict=False):
        put(f"G{g.index}_ROT", t.rotation)
        put(f"G{g.index}_ROTT", t.rotation.T)
        if t.projection is not None:
            put(f"G{g.index}_PROJ", t.projection)
            put(f"G{g.index}_PROJT", t.projection.T)
        put(f"G{g.index}_CENT", t.centroids)
        put(f"G{g.index}_BND", t.boundaries)
    return np.concatenate(parts), offsets


@functools.cache
def _centroid_scale(cfg: CodecConfig, group: int) -> float:
    """Factor s = sqrt(g) / 2**k in [1, 2) for group ``group``'s centroid table.

    Codec centroids are float16 values divided by sqrt(g) (``codebooks.codec_codebook``), so
    s * centroid is a float16 value times 2**-k: the attention kernel's float16 tensor-core operands
    hold every centroid exactly. 1/s joins the per-token norm scale.
    """
    root = math.sqrt(cfg.groups[group].dim)
    return root / 2.0 ** math.floor(math.log2(root))


@functools.cache
def _lut_values(cfg: CodecConfig) -> np.ndarray:
    """Per field (group by group, codes before signs) its PAIR table, concatenated: (entries,)
    uint32 of float16 pairs. Entry ``e0 | e1 << bits`` holds float16(s * value) of code e0 in bits
    0-15 and of e1 in bits 16-31 (s from ``_centroid_scale`` for codes, 1 for signs {-1, +1}), so
    one lookup yields one mma register (two adjacent codes of a key, or one dim of two value tokens)."""
    out = []
    for g, t in zip(cfg.groups, tables(cfg), strict=False):
        fields = [(t.centroids * _centroid_scale(cfg, g.index), g.code_bits)]
        if g.qjl:
            fields.append((np.array([-1.0, 1.0]), 1))
        for vals, bits in fields:
            h = vals.astype(np.float16).view(np.uint16).astype(np.uint32)
            idx = np.arange(1 << (2 * bits))
            out.append(h[idx & ((1 << bits) - 1)] | (h[idx >> bits] << 16))
    return np.concatenate(out).astype(np.uint32)


def _fdims(cfg: CodecConfig) -> int:
    """Width of ``cfg``'s rotated domain: the code fields, plus as many QJL sign fields in prod mode
    (``fdims()`` of tq_common.cuh)."""
    return cfg.d * (2 if cfg.mode == "prod" else 1)


def _codec_macros(prefix: str, cfg: CodecConfig) -> list[str]:
    """``-D`` options describing ``cfg``'s record and table layout to the C++ (tq_common.cuh)."""
    _, offs = _layout(cfg)
    groups = cfg.groups
    m: dict[str, int | str] = {
        "D": cfg.d,
        "R": cfg.record_bytes,
        "NG": len(groups),
        "QJL": int(cfg.mode == "prod"),
    }
    for i in range(2):
        g = groups[min(i, len(groups) - 1)]
        m.update(
            {
                f"G{i}_DIM": g.dim,
                f"G{i}_BITS": g.code_bits,
                f"G{i}_CODE": g.code_offset,
                f"G{i}_SIGN": max(g.sign_offset, 0),
                f"G{i}_NORM": g.norm_offset,
                f"G{i}_QJL": f"{math.sqrt(math.pi / 2) / g.dim!r}f",
                f"G{i}_CS": f"{1.0 / _centroid_scale(cfg, g.index)!r}f",
            }
        )
        for part in ("ROT", "ROTT", "PROJ", "PROJT", "CENT", "BND"):
            m[f"G{i}_{part}"] = offs.get(f"G{g.index}_{part}", 0)
    return [f"-D{prefix}_{k}={v}" for k, v in m.items()]


def compile_options(kind: str, **params: Any) -> list[str]:
    """The ``-D`` options of one kernel family (``"codec"`` or ``"attention"``).

    Parameters
    ----------
    kind : {"codec", "attention"}
    **params
        codec: ``cfg``, ``dtype``, optionally ``smem_optin`` (the device's shared memory per block,
        which sets the encode's warps per block; default: sm_90's), ``wgmma`` (warps in whole
        warpgroups; the caller builds for sm_90a), ``warps`` and ``mt`` (m-tiles per warp tile;
        given: those). attention: ``k_cfg``, ``v_cfg``, ``dtype`` (query), ``tail_dtype``, ``group``
        (query heads per KV head). Both: ``tuning`` (``CupyRawTuning``; default: the settings in
        force).

    Returns
    -------
    list of str
        Also used by ``tests/test_cuda_sources.py`` to compile the same instantiations with nvcc.
    """
    tuning = params.get("tuning") or _tuning.current().cupy_raw
    if kind == "codec":
        cfg, dtype = params["cfg"], params["dtype"]
        optin, wgmma = params.get("smem_optin", SM90_SMEM_OPTIN), params.get("wgmma", False)
        mt = params.get("mt") or _tc_mt(dtype, tuning)
        warps = params.get("warps") or _tc_warps(cfg, dtype, optin, wgmma, tuning)
        return [*_codec_macros("C", cfg), f"-DIN_KIND={_DTYPE_KIND[dtype]}",
                f"-DENC_WARPS={warps}", f"-DENC_MT={mt}", *_tc_grid_macros(cfg),
                f"-DTC_RS_EXP={cupy_raw_tc.RS_EXP}", f"-DTC_WG_LBO={cupy_raw_tc.WG_LBO}",
                f"-DTC_WG_SBO={cupy_raw_tc.WG_SBO}"]
    return [
        *_codec_macros("K", params["k_cfg"]),
        *_codec_macros("V", params["v_cfg"]),
        f"-DIN_KIND={_DTYPE_KIND[params['dtype']]}",
        f"-DTAIL_KIND={_DTYPE_KIND[params.get('tail_dtype', 'float32')]}",
        f"-DGQ={params['group']}",
        f"-DKV_SAME_LUT={int(_same_lut(params['k_cfg'], params['v_cfg']))}",
        f"-DNWARPS={tuning.attn_warps}",
        f"-DSTAGES={attention_stages(params['k_cfg'], params['v_cfg'], tuning)}",
        f"-DMINBLOCKS={tuning.attn_minblocks}",
    ]


def _tc_grid_macros(cfg: CodecConfig) -> list[str]:
    """Each group slot's ``cupy_raw_tc.grid`` (the second repeats a lone group): ``-DTC_GS{g}``
    scale (exact hex float), ``-DTC_GO{g}`` offset, ``-DTC_GN{g}`` bins, ``-DTC_GI{g}`` whether
    counts are indices."""
    grids = list(cupy_raw_tc.group_grids(cfg))
    grids += grids[-1:] * (2 - len(grids))
    return [opt for g, gr in enumerate(grids)
            for opt in (f"-DTC_GS{g}={float(gr.scale).hex()}f", f"-DTC_GO{g}={gr.offset}",
                        f"-DTC_GN{g}={len(gr.bound)}", f"-DTC_GI{g}={int(gr.below_is_index)}")]


@functools.cache
def _module(device: int, source: str, options: tuple[str, ...]) -> Any:
    """Compiled RawModule of ``source`` for ``device`` (memoised; CuPy also caches on disk)."""
    cp = _cupy()
    with cp.cuda.Device(device):
        # The shared headers are inlined: CuPy's disk cache keys on the source text, so an edited
        # header must change the key. Each is inlined once, at its first include (#pragma once).
        code = (CUDA_DIR / source).read_text()
        for name in HEADERS:
            include = f'#include "{name}"'
            code = code.replace(include, (CUDA_DIR / name).read_text(), 1).replace(include, "")
        mod = cp.RawModule(code=code, options=("-std=c++17", *options), backend="nvrtc")
        mod.compile()
        return mod


@functools.cache
def _device_tables(device: int, cfg: CodecConfig) -> tuple[Any, Any]:
    """(table buffer, field value tables) of ``cfg`` on ``device``, uploaded once."""
    cp = _cupy()
    with cp.cuda.Device(device):
        buf, _ = _layout(cfg)
        return cp.asarray(buf), cp.asarray(_lut_values(cfg))


@functools.cache
def _sm_count(device: int) -> int:
    cp = _cupy()
    return int(cp.cuda.Device(device).attributes["MultiProcessorCount"])


@functools.cache
def _smem_optin(device: int) -> int:
    return int(_cupy().cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"])


def _wgmma(device: int, tuning: CupyRawTuning) -> bool:
    return _sm90(device) if tuning.enc_tc_wgmma is None else tuning.enc_tc_wgmma


@functools.cache
def _sm90(device: int) -> bool:
    """Whether ``device`` has compute capability 9.0 (asked once: every codec op consults it)."""
    return bool(_cupy().cuda.Device(device).compute_capability == "90")


def _codec_module(device: int, cfg: CodecConfig, dtype: str, tuning: CupyRawTuning | None = None) -> Any:
    """The codec kernels of ``cfg`` for ``dtype`` input, built for ``tuning`` (default: the settings
    in force)."""
    launch = _tc_launch(device, cfg, dtype, tuning or _tuning.current().cupy_raw)
    return _codec_build(device, cfg, dtype, *launch)


def _tc_launch(device: int, cfg: CodecConfig, dtype: str, tuning: CupyRawTuning) -> tuple[bool, int, int]:
    """(wgmma, warps per block, m-tiles per warp tile) of tq_encode_tc on ``device`` under ``tuning``."""
    wgmma = _wgmma(device, tuning)
    return wgmma, _tc_warps(cfg, dtype, _smem_optin(device), wgmma, tuning), _tc_mt(dtype, tuning)


@functools.cache
def _codec_build(device: int, cfg: CodecConfig, dtype: str, wgmma: bool, warps: int, mt: int) -> Any:
    opts = compile_options("codec", cfg=cfg, dtype=dtype, wgmma=wgmma, warps=warps, mt=mt)
    mod = _module(device, "tq_codec.cu", (*opts, *(("-arch=sm_90a",) if wgmma else ())))
    smem = _tc_smem(cfg, dtype, warps, mt)
    if tc_encode_ok(cfg) and smem > 48 * 1024:
        # The opt-in is an attribute of the driver's function handle: set once per build, not per call.
        mod.get_function("tq_encode_tc").max_dynamic_shared_size_bytes = smem
    return mod


# ------------------------------------------------------------------------------------ tensor-core encode
def tc_encode_ok(cfg: CodecConfig) -> bool:
    """Whether ``tq_encode_tc`` covers ``cfg`` (any input dtype): mode "mse" (prod's QJL projection
    stays on the scalar kernel) and every channel group of 32, 64 or 128 channels (whole 16 x 16
    k-steps, a byte-aligned piece of G/4 codes per thread, fragments that fit in registers)."""
    return cfg.mode == "mse" and all(g.dim in (32, 64, 128) for g in cfg.groups)


@functools.cache
def _device_tc_table(device: int, cfg: CodecConfig, dtype: str, wgmma: bool) -> Any:
    cp = _cupy()
    with cp.cuda.Device(device):
        return cp.asarray(cupy_raw_tc.fragment_table(cfg, dtype, wgmma))


def _tc_smem_parts(cfg: CodecConfig, dtype: str, mt: int) -> tuple[int, int]:
    """Dynamic shared memory of tq_encode_tc (mirrors its layout) with ``mt`` m-tiles per warp tile:
    (fragment tables, per warp: its staged tile, channel list and record buffer)."""
    es = 4 if dtype == "float32" else 2
    nv = 16 * mt
    tables_ = sum(4 * g.dim**2 for g in cfg.groups)
    return tables_, nv * cfg.d * es + 2 * cfg.d + nv * cfg.record_bytes


def _tc_warps(cfg: CodecConfig, dtype: str, smem_optin: int, wgmma: bool, tuning: CupyRawTuning) -> int:
    fixed, per_warp = _tc_smem_parts(cfg, dtype, _tc_mt(dtype, tuning))
    fit = (smem_optin - fixed) // per_warp
    unit = 4 if wgmma else 1  # wgmma: whole warpgroups
    want = tuning.enc_tc_warps
    if want is None:
        return max(unit, min(tuning.enc_tc_max_warps, fit) // unit * unit)
    if not 1 <= want <= fit or want % unit:
        raise ValueError(f"enc_tc_warps={want}: tq_encode_tc fits 1 to {fit} warps per block "
                         f"for {cfg} with {dtype} input ({smem_optin} bytes of shared memory per block)"
                         + (", in whole warpgroups of 4 (wgmma)" if wgmma else ""))
    return want


def _tc_smem(cfg: CodecConfig, dtype: str, warps: int, mt: int) -> int:
    fixed, per_warp = _tc_smem_parts(cfg, dtype, mt)
    return fixed + warps * per_warp


def _tc_mt(dtype: str, tuning: CupyRawTuning) -> int:
    return tuning.enc_tc_mt if tuning.enc_tc_mt is not None else (1 if dtype == "float32" else 2)


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
    wgmma, warps, mt = _tc_launch(device, cfg, dtype, tuning)
    fn = _codec_build(device, cfg, dtype, wgmma, warps, mt).get_function("tq_encode_tc")
    smem = _tc_smem(cfg, dtype, warps, mt)
    attrs = _cupy().cuda.Device(device).attributes
    per_sm = resident_blocks(int(fn.num_regs), int(fn.shared_size_bytes) + smem, 32 * warps,
                             attrs["MaxRegistersPerMultiprocessor"],
                             attrs["MaxSharedMemoryPerMultiprocessor"],
                             attrs["MaxThreadsPerMultiProcessor"])
    return _TcPlan(fn, _device_tc_table(device, cfg, dtype, wgmma), smem, per_sm * _sm_count(device), warps,
                   16 * mt)


def use_tc_encode(cfg: CodecConfig, n: int, tuning: CupyRawTuning) -> bool:
    """Whether an encode of ``n`` vectors runs tq_encode_tc under ``tuning`` (else tq_encode)."""
    return bool(n) and tuning.encode_path != "scalar" and tc_encode_ok(cfg)


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


# ------------------------------------------------------------------------------------ channels
def select_channels(x: Any, cfg: CodecConfig, dtype: str, tuning: CupyRawTuning | None = None) -> Any:
    """GPU twin of ``numpy_ref.select_channels``: (*lead, d) uint16, no host synchronisation.

    Mean squares are summed in float64; ranks break ties towards the lower channel index.
    """
    cp = _cupy()
    *lead, n, d = x.shape
    streams = math.prod(lead)
    device = int(x.device.id)
    mod = _codec_module(device, cfg, dtype, tuning)
    energy = cp.zeros((streams, d), cp.float64)
    chunk = max(64, -(-n // max(1, (4 * _sm_count(device)) // max(1, streams * -(-d // 32)))))
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


# ------------------------------------------------------------------------------------ ops
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
        if use_tc_encode(cfg, n, tuning) and xw.data.ptr % 16:  # cp.async reads 16-byte chunks
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
    if use_tc_encode(cfg, n, tuning):
        _encode_tc(xw, dtype, cfg, ch, n, streams, rec, device, tuning)
        return
    tab, _ = _device_tables(device, cfg)
    tv = ENC_TV_PROD if cfg.mode == "prod" else ENC_TV
    _codec_module(device, cfg, dtype, tuning).get_function("tq_encode")(
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
        mod = _codec_module(device, cfg, "float32")
        tab, _ = _device_tables(device, cfg)
        out = cp.empty((*lead, n, cfg.d), cp.float32)
        ch = None if enc.channels is None else cp.ascontiguousarray(enc.channels, dtype=cp.uint16)
        mod.get_function("tq_decode")(
            (-(-n // TILE), streams), (128,), (rec, ch if ch is not None else _NULL, np.int32(n), tab, out)
        )
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
        mod = _codec_module(device, cfg, dtype)
        tab, _ = _device_tables(device, cfg)
        ch = None if keys.channels is None else cp.ascontiguousarray(keys.channels, dtype=cp.uint16)
        qf = cp.empty((streams * m, _fdims(cfg)), cp.float32)
        mod.get_function("tq_qrot")(
            (streams * m,), (128,), (qw, ch if ch is not None else _NULL, np.int32(m), tab, qf)
        )
        out = cp.empty((*lead, m, n), cp.float32)
        mod.get_function("tq_scores")(
            (-(-n // TILE), streams), (128,), (rec, qf, np.int32(n), np.int32(m), tab, out)
        )
        return out


@functools.cache
def _attention_module(device: int, k_cfg: CodecConfig, v_cfg: CodecConfig, dtype: str, tail_dtype: str,
                      group: int, tuning: CupyRawTuning) -> Any:
    opts = compile_options(
        "attention", k_cfg=k_cfg, v_cfg=v_cfg, dtype=dtype, tail_dtype=tail_dtype, group=group, tuning=tuning
    )
    return _module(device, "tq_attention.cu", tuple(opts))


def attention_stages(k_cfg: CodecConfig, v_cfg: CodecConfig, tuning: CupyRawTuning) -> int:
    """cp.async ring depth of the split kernel: ``tuning.attn_stages``, or fewer where shared memory
    is short."""
    for stages in range(tuning.attn_stages, 1, -1):
        if _split_smem(k_cfg, v_cfg, stages, tuning.attn_warps) <= SMEM_LIMIT:
            return stages
    raise ValueError(f"attention tables of {k_cfg} / {v_cfg} do not fit {SMEM_LIMIT} B of shared memory")


@functools.cache
def _split_smem(k_cfg: CodecConfig, v_cfg: CodecConfig, stages: int, warps: int) -> int:
    """Dynamic shared memory of tq_attn_split with ``warps`` warps and a ``stages``-deep ring
    (mirrors the carve-up at the top of the kernel)."""

    def lutn(cfg: CodecConfig) -> int:
        return sum((1 << 2 * g.code_bits) + (4 if g.qjl else 0) for g in cfg.groups)

    tile_k, tile_v = TILE * k_cfg.record_bytes + 32, TILE * v_cfg.record_bytes + 32
    stage = -(-(tile_k + tile_v) // 16) * 16
    # Pair tables, 4 B per entry and lane: K's, and V's unless V shares them.
    luts = 4 * 32 * (lutn(k_cfg) + (0 if _same_lut(k_cfg, v_cfg) else lutn(v_cfg)))
    return luts + warps * stages * stage


def _merge_smem(v_cfg: CodecConfig, group: int, warps: int) -> int:
    """Shared memory of tq_attn_split's closing merge (mirrors its wm | wl | wacc carve-up)."""
    heads = min(group, 8)
    vqd = _fdims(v_cfg)
    row = vqd + vqd // 16 + (20 - (vqd + vqd // 16) % 16) % 16
    return 4 * warps * heads * (2 + row)


def _same_lut(k_cfg: CodecConfig, v_cfg: CodecConfig) -> bool:
    """Whether K and V use identical pair tables (then the kernel keeps one shared-memory copy)."""
    a, b = _lut_values(k_cfg), _lut_values(v_cfg)
    return a.shape == b.shape and bool(np.array_equal(a, b))


# Split blocks per KV stream at most (so at most this many partials per stream for the reduce).
MAX_BLOCKS_PER_STREAM = 64


def attention_plan(batch_heads: int, n: int, device: int, tuning: CupyRawTuning) -> tuple[int, int]:
    """(tiles per warp, partials per KV stream) for ``batch_heads`` streams of ``n`` tokens.

    Partials per stream come in whole blocks of ``tuning.attn_warps`` warps. The number of blocks per
    stream is the smallest that fills the GPU's resident block slots to >= 95% in whole waves
    (a last, partly filled wave leaves SMs idle), else the best-filling one; warps keep >= 4 tiles.
    O(1) per call once the block count of (``batch_heads``, cap) is known: a decode loop's ``n``
    changes every step.
    """
    warps = tuning.attn_warps
    ntiles = max(1, -(-n // TILE))
    most = max(1, min(MAX_BLOCKS_PER_STREAM, ntiles // (4 * warps)))
    m = _blocks_per_stream(batch_heads, most, _sm_count(device) * tuning.attn_minblocks)
    per_warp = -(-ntiles // (m * warps))
    return per_warp, -(-ntiles // per_warp)


@functools.lru_cache(maxsize=4096)
def _blocks_per_stream(batch_heads: int, most: int, slots: int) -> int:
    """``attention_plan``'s block count per stream, 1..``most``, for ``slots`` resident blocks."""

    def fill(m: int) -> float:
        blocks = batch_heads * m
        return blocks / (-(-blocks // slots) * slots)

    good = [m for m in range(1, most + 1) if fill(m) >= 0.95 and batch_heads * m >= 0.95 * slots]
    return good[0] if good else max(range(1, most + 1), key=lambda m: (fill(m), -m))


def _reduce_smem(v_cfg: CodecConfig, nblocks: int) -> int:
    """Dynamic shared memory of tq_attn_reduce (mirrors its carve-up) for ``nblocks`` partials."""
    vqd = _fdims(v_cfg)
    return 4 * (nblocks + vqd + 3 * v_cfg.d + 64 + REDUCE_THREADS // 32 * vqd)


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
    """One call shape's split (``attention_plan``) and scratch: the byte offsets of the query prep's
    outputs and of the partials inside one allocation, and the launch arguments that depend only on
    the shape."""

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
    per_warp, nparts = attention_plan(bh, n, device, plan.tuning) if n > 0 else (1, 0)
    nblocks = -(-nparts // warps)  # one partial per split block
    kqd, vqd = _fdims(k_cfg), _fdims(v_cfg)
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
        _reduce_smem(v_cfg, nblocks), ints,
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
    mod = _attention_module(device, k_cfg, v_cfg, dtype, tail_dtype, group, tuning)
    warps = tuning.attn_warps
    split_smem = max(_split_smem(k_cfg, v_cfg, attention_stages(k_cfg, v_cfg, tuning), warps),
                     _merge_smem(v_cfg, group, warps))
    split, reduce = mod.get_function("tq_attn_split"), mod.get_function("tq_attn_reduce")
    for fn, smem in ((split, split_smem), (reduce, _reduce_smem(v_cfg, MAX_BLOCKS_PER_STREAM))):
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = max(smem, fn.max_dynamic_shared_size_bytes)
    tables = (*_device_tables(device, k_cfg), *_device_tables(device, v_cfg))
    return _AttentionLaunch(tuning, mod.get_function("tq_attn_prep").kernel, split.kernel, reduce.kernel,
                            split_smem, tables, tuple(_pointer_arg(t.data.ptr) for t in tables))


# ------------------------------------------------------------------------------------ launch arguments
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
        ktab, klut, vtab, vlut = plan.table_args
        lay = _attention_layout(plan, device, bh, n, d, group, k.config, v.config)
        # One allocation for the query prep's outputs and the partials (one pool call instead of six);
        # it returns to the pool, on this stream, when ``scratch`` goes.
        scratch = cp.cuda.alloc(lay.nbytes)
        base = scratch.ptr
        q32, qh, qscale, part_m, part_l, part_acc = (_pointer_arg(base + off) for off in lay.offsets)
        fscale = _scale_arg(scale)
        n32, per_warp32, nparts32, nblocks32 = lay.ints
        plan.prep(lay.rows_grid, (128,), (qw, kch, ktab, fscale, q32, qh, qscale))
        if lay.nparts:
            plan.split(
                lay.split_grid,
                lay.split_block,
                (krec, vrec, qh, qscale, klut, vlut, part_m, part_l, part_acc, n32, per_warp32, nparts32),
                plan.split_smem,
            )
        out = cp.ndarray(q_shape, cp.float32)
        plan.reduce(
            lay.rows_grid,
            (REDUCE_THREADS,),
            (part_m, part_l, part_acc, nblocks32, q32, ktw, vtw, t_len, fscale, vtab, vch, out),
            lay.reduce_smem,
        )
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
    q32, qh, qscale, part_m, part_l, part_acc = (np.uint64(base + off) for off in lay.offsets)
    ktab, klut, vtab, vlut = (np.uint64(t.data.ptr) for t in plan.tables)
    kch, vch = (np.uint64(0 if c is None else c.data.ptr) for c in channels)
    ktw, vtw = (np.uint64(t.data.ptr) for t in tails) if tails else (np.uint64(0), np.uint64(0))
    fscale = np.float32(scale)
    launches = [cupy_launch.Launch(plan.prep, lay.rows_grid, (128,),
                                   (np.uint64(qw.data.ptr), kch, ktab, fscale, q32, qh, qscale), 0)]
    if lay.nparts:
        launches.append(cupy_launch.Launch(
            plan.split, lay.split_grid, lay.split_block,
            (np.uint64(k.records.data.ptr), np.uint64(v.records.data.ptr), qh, qscale, klut, vlut, part_m,
             part_l, part_acc, np.int32(n), np.int32(lay.per_warp), np.int32(lay.nparts)), plan.split_smem))
    launches.append(cupy_launch.Launch(
        plan.reduce, lay.rows_grid, (REDUCE_THREADS,),
        (part_m, part_l, part_acc, np.int32(lay.nblocks), q32, ktw, vtw, t_len, fscale, vtab, vch,
         np.uint64(out.data.ptr)), lay.reduce_smem))
    return functools.partial(cupy_launch.run_in_order, tuple(launches), device)


# ------------------------------------------------------------------------------------ paged ops
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
