"""Host-side planning of cupy_raw's fused attention, checked without a GPU: the pair tables' exact
float16 values, the shared-memory budget of every configuration the capability table admits, and the
split of a batch over the SMs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from turboquant_codec.backends import (
    cupy_raw_attn,
    cupy_raw_build,
    cupy_raw_device,
    cupy_raw_tables,
    occupancy,
)
from turboquant_codec.capabilities import ALL_BITS, CAPABILITIES
from turboquant_codec.config import CodecConfig
from turboquant_codec.transforms import tables
from turboquant_codec.tuning import CupyRawTuning

SUPPORT = CAPABILITIES["attention"]["cupy_raw"]
CONFIGS = [
    CodecConfig(d, bits, mode)
    for d in SUPPORT.head_dims
    for mode, widths in (SUPPORT.bits or ALL_BITS).items()
    for bits in widths
]
H100_SMS = 132
DEFAULT = CupyRawTuning()


def _halves(words: np.ndarray) -> np.ndarray:
    """uint32 pair words -> (entries, 2) float64 values of the two float16 halves (low first)."""
    h = np.stack([words & 0xFFFF, words >> 16], axis=-1).astype(np.uint16)
    return h.view(np.float16).astype(np.float64)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"d{c.d}-{c.mode}{c.bits:g}")
def test_pair_tables_hold_scaled_centroids_exactly(cfg: CodecConfig) -> None:
    lut = cupy_raw_tables.lut_values(cfg)
    assert lut.dtype == np.uint32 and lut.ndim == 1
    start = 0
    for g, t in zip(cfg.groups, tables(cfg), strict=True):
        s = cupy_raw_tables.centroid_scale(cfg, g.index)
        assert 1.0 <= s < 2.0
        fields = [(t.centroids * s, g.code_bits)]
        if g.qjl:
            fields.append((np.array([-1.0, 1.0]), 1))
        for want, bits in fields:
            n = 1 << (2 * bits)
            idx = np.arange(n)
            pair = np.stack([want[idx & ((1 << bits) - 1)], want[idx >> bits]], axis=-1)
            # One float16 per code, no remainder: the kernel's products are float32-level.
            np.testing.assert_allclose(_halves(lut[start:start + n]), pair, rtol=1e-15, atol=0)
            start += n
    assert start == len(lut)


@pytest.mark.parametrize("v_cfg", CONFIGS, ids=lambda c: f"v-d{c.d}-{c.mode}{c.bits:g}")
def test_every_configuration_fits_shared_memory(v_cfg: CodecConfig) -> None:
    warps = DEFAULT.attn_warps
    for k_cfg in (c for c in CONFIGS if c.d == v_cfg.d):
        stages = cupy_raw_attn.attention_stages(k_cfg, v_cfg, DEFAULT)
        assert 2 <= stages <= DEFAULT.attn_stages
        assert cupy_raw_attn.split_smem(k_cfg, v_cfg, stages, warps) <= occupancy.SM90_SMEM_OPTIN
        for group in (1, 4, 8, 32):
            assert cupy_raw_attn.merge_smem(v_cfg, group, warps) <= occupancy.SM90_SMEM_OPTIN
        if stages < DEFAULT.attn_stages:
            assert cupy_raw_attn.split_smem(k_cfg, v_cfg, stages + 1, warps) > occupancy.SM90_SMEM_OPTIN


@pytest.mark.parametrize(
    ("batch_heads", "n"),
    [(64, 32768), (8, 131072), (256, 8192), (1, 1), (3, 17), (16, 1000), (40, 65536), (1024, 4096)],
)
def test_attention_plan_covers_every_tile_and_fills_waves(monkeypatch: pytest.MonkeyPatch,
                                                          batch_heads: int, n: int) -> None:
    monkeypatch.setattr(cupy_raw_device, "sm_count", lambda device: H100_SMS)
    per_warp, parts = cupy_raw_attn.attention_plan(batch_heads, n, 0, DEFAULT)
    ntiles = -(-n // cupy_raw_attn.TILE)
    assert per_warp >= 1 and parts >= 1
    assert (parts - 1) * per_warp < ntiles <= parts * per_warp  # every tile once, no empty partial
    blocks = batch_heads * -(-parts // DEFAULT.attn_warps)
    slots = H100_SMS * DEFAULT.attn_minblocks
    if ntiles >= 64 * 4 * DEFAULT.attn_warps and batch_heads <= slots:
        # Long enough for any of the plan's 1..64 blocks per stream (>= 4 tiles per warp): whole
        # waves, at least 95% of the resident block slots busy.
        assert blocks / (-(-blocks // slots) * slots) >= 0.95
    # At most MAX_BLOCKS_PER_STREAM partials per stream: the reduce's shared memory is sized for it.
    assert -(-parts // DEFAULT.attn_warps) <= cupy_raw_attn.MAX_BLOCKS_PER_STREAM


# H100 per-SM limits: registers, shared memory (bytes), threads.
H100_SM = (65536, 233472, 2048)


@pytest.mark.parametrize(
    ("regs", "smem", "threads", "blocks"),
    [
        # The double-buffered tq_encode_tc at 112 registers, 4 / 8 / 2 warps x 2 m-tiles of bf16
        # staging: shared memory bounds them (the H100 ran 264, 132 and 660 blocks on 132 SMs).
        (112, 77312, 128, 2),
        (112, 154624, 256, 1),
        (112, 38656, 64, 5),
        # Today's, 12 warps at 168 registers with its tables (d=128, 3.5 bits): one block per SM.
        (168, 159232, 384, 1),
        (64, 0, 256, 4),     # registers bound: 8 warps x 2048 of 65536
        (16, 0, 1024, 2),    # threads bound
        (255, 0, 512, 1),    # over every limit: still one block
    ],
    ids=["enc-4w", "enc-8w", "enc-2w", "enc-12w", "regs", "threads", "floor"],
)
def test_resident_blocks_takes_the_tightest_sm_limit(regs: int, smem: int, threads: int, blocks: int) -> None:
    assert occupancy.resident_blocks(regs, smem, threads, *H100_SM) == blocks


def test_shared_layouts_name_the_kernels_parts_in_order() -> None:
    """Each planned shared-memory layout lists the parts the kernel carves, in the kernel's order
    (read from the .cu text), and its size is the sum of the parts."""
    import re

    from turboquant_codec.backends import cupy_raw_build

    attention = (cupy_raw_build.CUDA_DIR / "tq_attention.cu").read_text()
    common = (cupy_raw_build.CUDA_DIR / "tq_attn_common.cuh").read_text()
    cfg = CodecConfig(128, 3.5, "prod")
    body = attention[attention.index("void tq_attn_reduce("):]
    cu_parts = re.findall(r"float\* (\w+) = (?:sm|\w+ \+ \w+);", body[:body.index("const int row")])
    reduce = cupy_raw_attn.reduce_layout(cfg, 5)
    assert [name for name, _ in reduce.parts] == cu_parts
    assert reduce.offset("yw") == 4 * (5 + 2 * 128 + 3 * 128 + 64)
    merge_parts = re.findall(r"float\* (\w+) = [^;]*;\s*// \[NW\]\[HR\]", common)
    merge = cupy_raw_attn.merge_layout(cfg, 4, 16)
    assert [name for name, _ in merge.parts] == merge_parts == ["wm", "wl", "wacc"]
    split = cupy_raw_attn.split_layout(cfg, cfg, 2, 16)
    assert [name for name, _ in split.parts] == ["K pair tables", "rings"]  # V's tables equal K's
    assert split.nbytes == sum(size for _, size in split.parts) == cupy_raw_attn.split_smem(cfg, cfg, 2, 16)


def _parameters(source: str, kernel: str) -> list[str]:
    """Parameter names of ``kernel`` in ``source`` (its ``extern "C" __global__`` signature)."""
    text = (cupy_raw_build.CUDA_DIR / source).read_text()
    params = re.search(kernel + r"\((.*?)\)\s*\{", text, re.S)
    assert params is not None, kernel
    return [re.findall(r"\w+", p)[-1] for p in params.group(1).split(",")]


@pytest.mark.parametrize("nparts", [0, 3])
def test_attention_calls_pass_each_kernel_its_parameters_in_order(nparts: int) -> None:
    """``cupy_raw._attention_calls`` (the launch list of ``attention`` and ``attention_replay``),
    with every argument labelled by its name: each kernel gets its own parameters in tq_attention.cu's
    order; no split where the context has no partials."""
    from types import SimpleNamespace

    from turboquant_codec.backends import cupy_raw

    plan = SimpleNamespace(prep="tq_attn_prep", split="tq_attn_split", reduce="tq_attn_reduce", split_smem=7)
    lay = SimpleNamespace(nparts=nparts, rows_grid=(8,), split_grid=(1, 2), split_block=(512,), reduce_smem=9)
    calls = cupy_raw._attention_calls(
        plan, lay, "q", ("krec", "vrec"), ("kch", "vch"), ("k_tail", "v_tail"), "t_len", "scale",
        ("q32", "qh", "qscale", "part_m", "part_l", "part_acc"), ("ktab", "klutv", "vtab", "vlutv"),
        ("n", "tiles_per_warp", "nparts", "nblocks"), "out")
    assert [c[0] for c in calls] == ["tq_attn_prep", *(["tq_attn_split"] if nparts else []), "tq_attn_reduce"]
    for kernel, _, _, args, _ in calls:
        want = _parameters("tq_attention.cu", kernel)
        if kernel == "tq_attn_reduce":  # its nparts: one partial per split block
            want = ["nblocks" if p == "nparts" else p for p in want]
        assert list(args) == want, kernel
