"""Building cupy_raw's kernels: each ``.cu`` compiled with NVRTC (``-std=c++17``) once per (device,
kernel family, configuration, settings), its configuration passed as ``#define``\\ d constants so
every loop over fields, k-steps and bits unrolls at compile time. Modules are memoised per device;
CuPy also caches the binaries on disk.

Layout owned here
-----------------
The ``-D`` options (``compile_options``): per codec ``{prefix}_D``, ``_R`` (record bytes), ``_NG``,
``_QJL`` and per group slot ``G{i}_DIM``, ``_BITS``, ``_CODE`` / ``_SIGN`` / ``_NORM`` (record byte
offsets), ``_QJL`` (scale), ``_CS`` (1 / centroid scale) and the table offsets (``cupy_raw_tables``);
``IN_KIND`` / ``TAIL_KIND`` dtype codes (``DTYPE_KIND``); the encode's ``ENC_WARPS``, ``ENC_MT`` and
grid macros; the attention's ``GQ``, ``KV_SAME_LUT``, ``NWARPS``, ``STAGES``, ``MINBLOCKS``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from .. import tuning as _tuning
from ..config import CodecConfig
from ..tuning import CupyRawTuning
from . import cupy_raw_attn as _attn
from . import cupy_raw_device as _device
from . import cupy_raw_tables as _tables
from . import cupy_raw_tc
from .occupancy import SM90_SMEM_OPTIN, STATIC_SMEM_LIMIT

CUDA_DIR = Path(__file__).with_name("cuda")
SOURCES = ("tq_codec.cu", "tq_attention.cu", "tq_paged.cu")  # tq_paged.cu: built by cupy_paged


# Headers the sources include, outermost first: tq_attn_common.cuh includes tq_common.cuh.
HEADERS = ("tq_attn_common.cuh", "tq_common.cuh")
# Input dtype codes of the kernels (IN_KIND, TAIL_KIND; load_float in tq_common.cuh).
DTYPE_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}


def codec_macros(prefix: str, cfg: CodecConfig) -> list[str]:
    """``-D`` options describing ``cfg``'s record and table layout to the C++ (tq_common.cuh)."""
    _, offs = _tables.layout(cfg)
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
                f"G{i}_CS": f"{1.0 / _tables.centroid_scale(cfg, g.index)!r}f",
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
        mt = params.get("mt") or cupy_raw_tc.encode_m_tiles(dtype, tuning)
        warps = params.get("warps") or cupy_raw_tc.encode_warps(cfg, dtype, optin, wgmma, tuning)
        return [*codec_macros("C", cfg), f"-DIN_KIND={DTYPE_KIND[dtype]}",
                f"-DENC_WARPS={warps}", f"-DENC_MT={mt}", *_tc_grid_macros(cfg),
                f"-DTC_RS_EXP={cupy_raw_tc.RS_EXP}", f"-DTC_WG_LBO={cupy_raw_tc.WG_LBO}",
                f"-DTC_WG_SBO={cupy_raw_tc.WG_SBO}"]
    return [
        *codec_macros("K", params["k_cfg"]),
        *codec_macros("V", params["v_cfg"]),
        f"-DIN_KIND={DTYPE_KIND[params['dtype']]}",
        f"-DTAIL_KIND={DTYPE_KIND[params.get('tail_dtype', 'float32')]}",
        f"-DGQ={params['group']}",
        f"-DKV_SAME_LUT={int(_tables.same_lut(params['k_cfg'], params['v_cfg']))}",
        f"-DNWARPS={tuning.attn_warps}",
        f"-DSTAGES={_attn.attention_stages(params['k_cfg'], params['v_cfg'], tuning)}",
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
def module(device: int, source: str, options: tuple[str, ...]) -> Any:
    """Compiled RawModule of ``source`` for ``device`` (memoised; CuPy also caches on disk)."""
    cp = _device.cupy()
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


def _wgmma(device: int, tuning: CupyRawTuning) -> bool:
    return _device.sm90(device) if tuning.enc_tc_wgmma is None else tuning.enc_tc_wgmma


def codec_module(device: int, cfg: CodecConfig, dtype: str, tuning: CupyRawTuning | None = None) -> Any:
    """The codec kernels of ``cfg`` for ``dtype`` input, built for ``tuning`` (default: the settings
    in force)."""
    launch = tc_launch(device, cfg, dtype, tuning or _tuning.current().cupy_raw)
    return codec_build(device, cfg, dtype, *launch)


def tc_launch(device: int, cfg: CodecConfig, dtype: str, tuning: CupyRawTuning) -> tuple[bool, int, int]:
    """(wgmma, warps per block, m-tiles per warp tile) of tq_encode_tc on ``device`` under ``tuning``."""
    wgmma = _wgmma(device, tuning)
    warps = cupy_raw_tc.encode_warps(cfg, dtype, _device.smem_optin(device), wgmma, tuning)
    return wgmma, warps, cupy_raw_tc.encode_m_tiles(dtype, tuning)


@functools.cache
def codec_build(device: int, cfg: CodecConfig, dtype: str, wgmma: bool, warps: int, mt: int) -> Any:
    """The codec kernels for one tensor-core encode launch shape (``tc_launch``)."""
    opts = compile_options("codec", cfg=cfg, dtype=dtype, wgmma=wgmma, warps=warps, mt=mt)
    mod = module(device, "tq_codec.cu", (*opts, *(("-arch=sm_90a",) if wgmma else ())))
    smem = cupy_raw_tc.encode_smem(cfg, dtype, warps, mt)
    if cupy_raw_tc.tc_encode_ok(cfg) and smem > STATIC_SMEM_LIMIT:
        # The opt-in is an attribute of the driver's function handle: set once per build, not per call.
        mod.get_function("tq_encode_tc").max_dynamic_shared_size_bytes = smem
    return mod


@functools.cache
def attention_module(device: int, k_cfg: CodecConfig, v_cfg: CodecConfig, dtype: str, tail_dtype: str,
                     group: int, tuning: CupyRawTuning) -> Any:
    """The attention kernels of one configuration, built for ``tuning``."""
    opts = compile_options(
        "attention", k_cfg=k_cfg, v_cfg=v_cfg, dtype=dtype, tail_dtype=tail_dtype, group=group, tuning=tuning
    )
    return module(device, "tq_attention.cu", tuple(opts))
