"""Host side of cupy_raw's tensor-core encode (``tq_encode_tc`` in ``cuda/tq_codec.cu``), in NumPy:
the tables it reads and the layout they own.

Per channel group of ``dim`` channels (32, 64 or 128) the rotation, scaled by ``2**RS_EXP``, is
split into hi + lo parts of a 16-bit type (``operand_dtype``, ``rotation_parts``) and laid out as
mma B fragments: per (n-tile, k-step, lane) four 32-bit words {hi b0, hi b1, lo b0, lo b1}, two
16-bit operands each, lower k in bits 0-15 (``positions`` maps each operand to its rotation entry).
On sm_90a the same words are permuted into wgmma's shared-memory layout (``wgmma_order``). After
every group's words, each group's code grid (``grid``) takes 64 words: per lane its bin's boundary
(float32 bits), then the count of boundaries below that bin. ``fragment_table`` assembles it all.

The kernel's launch shape is planned here too: which configurations it serves (``tc_encode_ok``),
its dynamic shared memory (the fragment tables | per warp: the staged input tile, the channel list
and the record buffer; ``encode_smem_parts``), and the warps per block and m-tiles per warp tile
that fit (``encode_warps``, ``encode_m_tiles``) under ``tuning.CupyRawTuning``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from ..config import CodecConfig
from ..transforms import tables
from ..tuning import CupyRawTuning

# The rotation is scaled by 2**RS_EXP before its 16-bit split, so its small entries keep their
# precision in float16 (kernel macro TC_RS_EXP).
RS_EXP = 8
# wgmma's no-swizzle K-major B layout (wgmma_order): bytes between 8 x 8 core matrices along k (LBO)
# and along n (SBO); kernel macros TC_WG_LBO / TC_WG_SBO. The convention was checked on an H200
# against NumPy (the other (LBO, SBO, trans-b) readings are wrong).
WG_LBO, WG_SBO = 128, 256


def positions(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, pos) index maps of the tensor-core encode fragments, each (dim/8, dim/16, 32 lanes, 2
    registers, 2 halves): mma B element [k][n] of n-tile nt and k-step ks is rotation[i][pos], with
    n = lane / 4 -> rotated coordinate i = (n / 2) * dim/4 + 2 nt + n % 2, and k = 2 (lane % 4) +
    half + 8 reg -> record position pos = lane % 4 + 4 (4 ks + 2 reg + half) (the kernel's gathers
    read 4 neighbouring positions at once, and k-step ks covers positions 16 ks .. 16 ks + 15)."""
    q = dim // 4
    nt = np.arange(dim // 8)[:, None, None, None, None]
    ks = np.arange(dim // 16)[None, :, None, None, None]
    lane = np.arange(32)[None, None, :, None, None]
    reg = np.arange(2)[None, None, None, :, None]
    half = np.arange(2)[None, None, None, None, :]
    n, t = lane // 4, lane % 4
    i = (n // 2) * q + 2 * nt + n % 2
    pos = t + 4 * (4 * ks + 2 * reg + half)
    shape = (dim // 8, dim // 16, 32, 2, 2)
    return np.broadcast_to(i, shape), np.broadcast_to(pos, shape)


def operand_dtype(dtype: str) -> Any:
    """The 16-bit type ``tq_encode_tc`` multiplies ``dtype`` input in: bfloat16 input as stored,
    float16 and float32 (split into hi + lo) as float16."""
    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16


def rotation_parts(rotation: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) of rotation * 2**RS_EXP in ``operand_dtype(dtype)``: hi + lo carries ~22 bits
    of every entry in float16, ~17 in bfloat16 (codes differ from float64 on ~5e-6 of coordinates)."""
    op = operand_dtype(dtype)
    scaled = np.asarray(rotation, np.float64) * 2.0**RS_EXP
    hi = scaled.astype(op)
    lo = (scaled - hi.astype(np.float64)).astype(op)
    return hi, lo


@functools.cache
def fragment_table(cfg: CodecConfig, dtype: str, wgmma: bool = False) -> np.ndarray:
    """uint32 table of ``tq_encode_tc`` for ``dtype`` input: per group, per (n-tile, k-step, lane)
    the fragment words {hi b0, hi b1, lo b0, lo b1} (``operand_dtype`` pairs, lower k in bits
    0-15), dim^2 words per group, or with ``wgmma`` the same words in wgmma's layout
    (``wgmma_order``); then per group its ``grid``, one word per lane: the bins' boundaries
    (float32 bits), then their counts below."""
    out = []
    for g, t in zip(cfg.groups, tables(cfg), strict=True):
        i, pos = positions(g.dim)
        words = []
        for part in rotation_parts(t.rotation, dtype):
            h = part.view(np.uint16)[i, pos].astype(np.uint32)  # (nt, ks, lane, reg, half)
            words.append(h[..., 0] | (h[..., 1] << 16))
        frag = np.concatenate(words, axis=-1).reshape(-1)  # hi b0, hi b1, lo b0, lo b1
        out.append(frag[wgmma_order(g.dim)] if wgmma else frag)
    for gr in group_grids(cfg):
        lanes = np.zeros((2, GRID_BINS), np.uint32)
        lanes[0, :len(gr.bound)], lanes[1, :len(gr.below)] = gr.bound.view(np.uint32), gr.below
        out.append(lanes.reshape(-1))
    return np.concatenate(out).astype(np.uint32)


def wgmma_order(dim: int) -> np.ndarray:
    """Fragment word of each word of one group's table in wgmma's layout, (dim^2,) indices.

    wgmma reads B from shared memory: per part (hi, lo) and k-step a 16 x dim block of 8 x 8 core
    matrices, element B[k][n] at byte ``(k // 8) * 128 + (n // 8) * 256 + (n % 8) * 16 + (k % 8) * 2``
    of the block (``WG_LBO``, ``WG_SBO``). Fragment word q of (n-tile nt, k-step
    ks, lane) holds B[k][n], B[k + 1][n] of part q // 2, k = 2 (lane % 4) + 8 (q % 2), n = 8 nt +
    lane / 4: one 32-bit word of the block, so the layout is a permutation of words.
    """
    nt, ks, lane, q = np.meshgrid(np.arange(dim // 8), np.arange(dim // 16), np.arange(32), np.arange(4),
                                  indexing="ij")
    k, n = 2 * (lane % 4) + 8 * (q % 2), 8 * nt + lane // 4
    byte = ((q // 2) * (dim // 16) + ks) * 32 * dim + (k // 8) * WG_LBO + (n // 8) * WG_SBO \
        + (n % 8) * 16 + (k % 8) * 2
    order = np.empty(dim * dim, np.intp)
    order[byte.reshape(-1) // 4] = np.arange(dim * dim)
    return order


@dataclass(frozen=True)
class Grid:
    """The tensor-core encode's code lookup for one group's sorted boundaries (``grid``).

    Rotated coordinate y (unit-vector units) falls in bin k = clamp(round(y * scale) + offset, 0,
    len(bound) - 1). Every bin holds at most one boundary, ``bound[k]`` (+inf if none), at least
    ``GRID_MARGIN`` of a bin from its edges, and ``below[k]`` boundaries lie below the bin; so the
    code, the number of boundaries strictly below y, is ``below[k] + (y > bound[k])``: one register
    lookup (a warp shuffle, bins <= 32) and one comparison per code. Where every bin holds exactly one
    boundary (``below`` is the bin index: 1- to 3-bit codes) the second shuffle is skipped.
    """

    scale: np.float32
    offset: int
    bound: np.ndarray  # float32, one per bin
    below: np.ndarray  # uint32, one per bin

    @property
    def below_is_index(self) -> bool:
        return bool(np.array_equal(self.below, np.arange(len(self.below))))


# Boundaries keep this fraction of a bin from the bin edges: the kernel's bin index rounds y * scale
# (relative error ~2^-23, far below it), so a near-edge y may land in the next bin only where no
# boundary is, and the code stays exact.
GRID_MARGIN = 0.01
GRID_BINS = 32  # one per lane


def grid(boundaries: np.ndarray) -> Grid:
    """The fewest bins of one width (``Grid``) that separate the sorted ``boundaries``."""
    b = np.asarray(boundaries, np.float32).astype(np.float64)
    n = b.size
    span = b[-1] - b[0] if n > 1 else 1.0
    scales = np.linspace(0.5 * max(n - 1, 1) / span, (GRID_BINS - 1) / span, 40001).astype(np.float32)
    ys = b[None, :] * scales[:, None].astype(np.float64)
    r = np.rint(ys)
    margin = 0.5 - np.max(np.abs(ys - r), axis=1)
    nbins = r[:, -1] - r[:, 0] + 1
    ok = (margin >= GRID_MARGIN) & np.all(np.diff(r, axis=1) >= 1, axis=1) & (nbins <= GRID_BINS)
    if not ok.any():  # cannot happen for the tables' boundaries (tests check every configuration)
        raise ValueError(f"no grid of <= {GRID_BINS} bins separates the boundaries {b}")
    best = np.lexsort((-margin, np.where(ok, nbins, np.inf)))[0]  # fewest bins, then widest margin
    scale, nbins_ = float(scales[best]), int(nbins[best])
    offset = -int(np.rint(b[0] * scale))
    k = np.rint(b * scale).astype(np.int64) + offset
    bound = np.full(nbins_, np.inf, np.float32)
    bound[k] = b
    below = np.searchsorted(k, np.arange(nbins_), side="left").astype(np.uint32)
    return Grid(np.float32(scale), offset, bound, below)


@functools.cache
def group_grids(cfg: CodecConfig) -> tuple[Grid, ...]:
    """``grid`` of each channel group's boundaries."""
    return tuple(grid(t.boundaries) for t in tables(cfg))


# ------------------------------------------------------------------------------------ planning
def tc_encode_ok(cfg: CodecConfig) -> bool:
    """Whether ``tq_encode_tc`` covers ``cfg`` (any input dtype): mode "mse" (prod's QJL projection
    stays on the scalar kernel) and every channel group of 32, 64 or 128 channels (whole 16 x 16
    k-steps, a byte-aligned piece of G/4 codes per thread, fragments that fit in registers)."""
    return cfg.mode == "mse" and all(g.dim in (32, 64, 128) for g in cfg.groups)


def encode_smem_parts(cfg: CodecConfig, dtype: str, mt: int) -> tuple[int, int]:
    """Dynamic shared memory of tq_encode_tc (mirrors its layout) with ``mt`` m-tiles per warp tile:
    (fragment tables, per warp: its staged tile, channel list and record buffer)."""
    es = 4 if dtype == "float32" else 2
    nv = 16 * mt
    tables_ = sum(4 * g.dim**2 for g in cfg.groups)
    return tables_, nv * cfg.d * es + 2 * cfg.d + nv * cfg.record_bytes


def encode_warps(cfg: CodecConfig, dtype: str, smem_optin: int, wgmma: bool, tuning: CupyRawTuning) -> int:
    """Warps per block of tq_encode_tc: ``tuning.enc_tc_warps``, or as many as ``smem_optin`` bytes
    hold (at most ``tuning.enc_tc_max_warps``; whole warpgroups for wgmma); ValueError with the
    numbers for a forced count that does not fit."""
    fixed, per_warp = encode_smem_parts(cfg, dtype, encode_m_tiles(dtype, tuning))
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


def encode_smem(cfg: CodecConfig, dtype: str, warps: int, mt: int) -> int:
    """Dynamic shared memory of tq_encode_tc with ``warps`` warps of ``mt`` m-tiles."""
    fixed, per_warp = encode_smem_parts(cfg, dtype, mt)
    return fixed + warps * per_warp


def encode_m_tiles(dtype: str, tuning: CupyRawTuning) -> int:
    """16-vector m-tiles per warp tile: ``tuning.enc_tc_mt``, else 2 (1 for float32 input)."""
    return tuning.enc_tc_mt if tuning.enc_tc_mt is not None else (1 if dtype == "float32" else 2)


def use_tc_encode(cfg: CodecConfig, n: int, tuning: CupyRawTuning) -> bool:
    """Whether an encode of ``n`` vectors runs tq_encode_tc under ``tuning`` (else tq_encode)."""
    return bool(n) and tuning.encode_path != "scalar" and tc_encode_ok(cfg)
