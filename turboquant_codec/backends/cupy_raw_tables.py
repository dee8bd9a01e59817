"""cupy_raw's tables: what each configuration's kernels read besides the records, laid out on the
host and uploaded once per (device, configuration).

Layout owned here
-----------------
- Table buffer (``layout``): one float32 array per configuration; per channel group, in order, the
  rotation, its transpose, the QJL projection and its transpose (prod only), the centroids and the
  boundaries, each part starting on a 16-byte boundary. Its float offsets reach the C++ as
  ``G{g}_ROT`` ... ``G{g}_BND`` macros (``cupy_raw_build.codec_macros``).
- Pair tables (``lut_values``): per field (group by group, codes before signs) ``4**bits`` uint32
  words, entry ``e0 | e1 << bits`` holding float16(s * value) of code e0 in bits 0-15 and of e1 in
  bits 16-31, which the attention kernels replicate per lane into shared memory.
- The tensor-core encode's fragment tables (``device_tc_table``) are laid out in ``cupy_raw_tc``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ..config import CodecConfig
from ..transforms import tables
from . import cupy_raw_device as _device
from . import cupy_raw_tc


@functools.cache
def layout(cfg: CodecConfig) -> tuple[np.ndarray, dict[str, int]]:
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
def centroid_scale(cfg: CodecConfig, group: int) -> float:
    """Factor s = sqrt(g) / 2**k in [1, 2) for group ``group``'s centroid table.

    Codec centroids are float16 values divided by sqrt(g) (``codebooks.codec_codebook``), so
    s * centroid is a float16 value times 2**-k: the attention kernel's float16 tensor-core operands
    hold every centroid exactly. 1/s joins the per-token norm scale.
    """
    root = math.sqrt(cfg.groups[group].dim)
    return root / 2.0 ** math.floor(math.log2(root))


@functools.cache
def lut_values(cfg: CodecConfig) -> np.ndarray:
    """Per field (group by group, codes before signs) its PAIR table, concatenated: (entries,)
    uint32 of float16 pairs. Entry ``e0 | e1 << bits`` holds float16(s * value) of code e0 in bits
    0-15 and of e1 in bits 16-31 (s from ``centroid_scale`` for codes, 1 for signs {-1, +1}), so
    one lookup yields one mma register (two adjacent codes of a key, or one dim of two value tokens)."""
    out = []
    for g, t in zip(cfg.groups, tables(cfg), strict=False):
        fields = [(t.centroids * centroid_scale(cfg, g.index), g.code_bits)]
        if g.qjl:
            fields.append((np.array([-1.0, 1.0]), 1))
        for vals, bits in fields:
            h = vals.astype(np.float16).view(np.uint16).astype(np.uint32)
            idx = np.arange(1 << (2 * bits))
            out.append(h[idx & ((1 << bits) - 1)] | (h[idx >> bits] << 16))
    return np.concatenate(out).astype(np.uint32)


def fdims(cfg: CodecConfig) -> int:
    """Width of ``cfg``'s rotated domain: the code fields, plus as many QJL sign fields in prod mode
    (``fdims()`` of tq_common.cuh)."""
    return cfg.d * (2 if cfg.mode == "prod" else 1)


@functools.cache
def device_tables(device: int, cfg: CodecConfig) -> tuple[Any, Any]:
    """(table buffer, field value tables) of ``cfg`` on ``device``, uploaded once."""
    cp = _device.cupy()
    with cp.cuda.Device(device):
        buf, _ = layout(cfg)
        return cp.asarray(buf), cp.asarray(lut_values(cfg))


@functools.cache
def device_tc_table(device: int, cfg: CodecConfig, dtype: str, wgmma: bool) -> Any:
    cp = _device.cupy()
    with cp.cuda.Device(device):
        return cp.asarray(cupy_raw_tc.fragment_table(cfg, dtype, wgmma))


def same_lut(k_cfg: CodecConfig, v_cfg: CodecConfig) -> bool:
    """Whether K and V use identical pair tables (then the kernel keeps one shared-memory copy)."""
    a, b = lut_values(k_cfg), lut_values(v_cfg)
    return a.shape == b.shape and bool(np.array_equal(a, b))
