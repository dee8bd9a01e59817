"""Planning of cupy_raw's fused decode attention (``cuda/tq_attention.cu``), on the host: the
shared memory of its kernels, the cp.async ring depth that fits, and how a batch's tiles are split
over warps and blocks.

Layout owned here
-----------------
Each kernel's dynamic shared memory is described once, as the kernel carves it
(``occupancy.SharedLayout``:
named parts in order; the names are those of the kernel's comments):

- ``tq_attn_split`` main loop (``split_layout``): K pair tables | V pair tables (absent when V's
  equal K's) | per warp a ring of ``stages`` stages, each one 16-token tile of K records and one of
  V records (+32 B slack each), rounded up to 16 B.
- its closing merge (``merge_layout``), reusing the same buffer: wm | wl | wacc, per warp and head
  (at most 8 heads per pass) the running max, the sum and a padded accumulator row.
- ``tq_attn_reduce`` (``reduce_layout``): w[nparts] | y[VQD] | z[D] | tail acc ta[D] | q qo[D] |
  logits lg[32] | red[32] | yw[nwarps][VQD], float32.
"""

from __future__ import annotations

import functools

from ..config import CodecConfig
from ..tuning import CupyRawTuning
from . import cupy_raw_device as _device
from . import cupy_raw_tables as _tables
from .occupancy import SM90_SMEM_OPTIN, SharedLayout

# Launch shapes (warps, ring stages, min blocks per SM) are settings: tuning.CupyRawTuning.
# Tokens per tile of every kernel (TILE in tq_common.cuh).
TILE = 16
# Threads of tq_attn_reduce: its warps split a stream's partials (one per split block) and the
# un-rotation's rows.
REDUCE_THREADS = 256
# Bytes of slack per tile in the ring: 16 B misalignment + 16 B over-read (TILE_BYTES_K / _V).
TILE_SLACK = 32
# Heads per merge round (HR in WarpAttn::merge).
MERGE_HEADS = 8


def lut_entries(cfg: CodecConfig) -> int:
    """Pair-table entries of ``cfg`` (``lutn()`` of tq_common.cuh): per group 4**bits for the codes,
    plus 4 for the QJL signs in prod mode."""
    return sum((1 << 2 * g.code_bits) + (4 if g.qjl else 0) for g in cfg.groups)


def pair_tables(k_cfg: CodecConfig, v_cfg: CodecConfig) -> tuple[tuple[str, int], ...]:
    """The pair-table parts at the start of a split kernel's shared memory (``load_tables``): 4 B per
    entry and lane, K's, then V's unless V's equal K's."""
    k = ("K pair tables", 4 * 32 * lut_entries(k_cfg))
    if _tables.same_lut(k_cfg, v_cfg):
        return (k,)
    return k, ("V pair tables", 4 * 32 * lut_entries(v_cfg))


def stage_bytes(k_tile: int, v_tile: int) -> int:
    """One ring stage: a tile of K records and one of V records, each with ``TILE_SLACK``, rounded up
    to 16 B (STAGE_BYTES)."""
    return -(-(k_tile + TILE_SLACK + v_tile + TILE_SLACK) // 16) * 16


def merge_row(v_cfg: CodecConfig) -> int:
    """Floats of one accumulator row in the merge (WS): VQD plus one pad per 16, then up to 4 mod 16."""
    vqd = _tables.fdims(v_cfg)
    return vqd + vqd // 16 + (20 - (vqd + vqd // 16) % 16) % 16


def attention_stages(k_cfg: CodecConfig, v_cfg: CodecConfig, tuning: CupyRawTuning) -> int:
    """cp.async ring depth of the split kernel: ``tuning.attn_stages``, or fewer where shared memory
    is short."""
    for stages in range(tuning.attn_stages, 1, -1):
        if split_smem(k_cfg, v_cfg, stages, tuning.attn_warps) <= SM90_SMEM_OPTIN:
            return stages
    raise ValueError(f"attention tables of {k_cfg} / {v_cfg} do not fit {SM90_SMEM_OPTIN} B "
                     "of shared memory")


@functools.cache
def split_layout(k_cfg: CodecConfig, v_cfg: CodecConfig, stages: int, warps: int) -> SharedLayout:
    """tq_attn_split's main loop with ``warps`` warps and a ``stages``-deep ring."""
    stage = stage_bytes(TILE * k_cfg.record_bytes, TILE * v_cfg.record_bytes)
    return SharedLayout((*pair_tables(k_cfg, v_cfg), ("rings", warps * stages * stage)))


def split_smem(k_cfg: CodecConfig, v_cfg: CodecConfig, stages: int, warps: int) -> int:
    """Bytes of ``split_layout``."""
    return split_layout(k_cfg, v_cfg, stages, warps).nbytes


def merge_layout(v_cfg: CodecConfig, group: int, warps: int) -> SharedLayout:
    """The split kernel's closing merge (``WarpAttn::merge``), float32 [warps][heads] each."""
    heads = min(group, MERGE_HEADS)
    per = 4 * warps * heads
    return SharedLayout((("wm", per), ("wl", per), ("wacc", per * merge_row(v_cfg))))


def merge_smem(v_cfg: CodecConfig, group: int, warps: int) -> int:
    """Bytes of ``merge_layout``."""
    return merge_layout(v_cfg, group, warps).nbytes


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
    m = _blocks_per_stream(batch_heads, most, _device.sm_count(device) * tuning.attn_minblocks)
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


def reduce_layout(v_cfg: CodecConfig, nblocks: int) -> SharedLayout:
    """tq_attn_reduce for ``nblocks`` partials per row, float32 parts."""
    vqd, d = _tables.fdims(v_cfg), v_cfg.d
    # The kernel's pointer names: weights, merged accumulator, un-rotated row, tail accumulator,
    # query, tail logits, reduction scratch, per-warp partial sums.
    floats = (("w", nblocks), ("y", vqd), ("z", d), ("ta", d), ("qo", d), ("lg", 32), ("red", 32),
              ("yw", REDUCE_THREADS // 32 * vqd))
    return SharedLayout(tuple((name, 4 * n) for name, n in floats))


def reduce_smem(v_cfg: CodecConfig, nblocks: int) -> int:
    """Bytes of ``reduce_layout``."""
    return reduce_layout(v_cfg, nblocks).nbytes
