"""Every CUDA source of the CuPy backend compiles for sm_90 with nvcc, warnings as errors.

Runs without a GPU: ``nvcc -cubin -arch=sm_90 -Werror all-warnings`` (sm_90a for the cases named so,
whose encode uses warpgroup mma) over the same ``-D`` options
(record layout, dtypes, query heads per KV head) the RawModule compiles at run time, for a spread of
configurations. Skipped only where nvcc is absent and ``CI`` is not "true" (on CI it must run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from turboquant_codec.backends import cupy_paged, cupy_raw_build
from turboquant_codec.config import CodecConfig
from turboquant_codec.tuning import CupyPagedTuning

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)

# (source, options): codec kernels per dtype/config, attention per K/V config, q/tail dtype and GQA;
# paged attention per layout (K and V packed in one state, or apart), block size and GQA.
_C = CodecConfig
_PAGED = cupy_paged.compile_options
CASES = {
    "codec-d128-mse3.5-bf16": ("tq_codec.cu", cupy_raw_build.compile_options(
        "codec", cfg=_C(128, 3.5), dtype="bfloat16")),
    # sm_90a: the encode's warpgroup-mma path (both group widths of its n32 / n64 products).
    "codec-d128-mse4-bf16-sm90a": ("tq_codec.cu", cupy_raw_build.compile_options(
        "codec", cfg=_C(128, 4.0), dtype="bfloat16", wgmma=True)),
    "codec-d64-mse2.5-f32-sm90a": ("tq_codec.cu", cupy_raw_build.compile_options(
        "codec", cfg=_C(64, 2.5), dtype="float32", wgmma=True)),
    # tq_write_tc with a raw pool of another dtype than the new tokens (-DRAW_KIND, as cupy_paged builds it).
    "codec-write-d128-mse3.5-f16-rawbf16-sm90a": ("tq_codec.cu", [*cupy_raw_build.compile_options(
        "codec", cfg=_C(128, 3.5), dtype="float16", wgmma=True), "-DRAW_KIND=2"]),
    "codec-d64-prod3-f32": ("tq_codec.cu", cupy_raw_build.compile_options(
        "codec", cfg=_C(64, 3.0, "prod"), dtype="float32")),
    "codec-d128-mse1-f16": ("tq_codec.cu", cupy_raw_build.compile_options(
        "codec", cfg=_C(128, 1.0), dtype="float16")),
    "codec-d128-mse4-f32": ("tq_codec.cu", cupy_raw_build.compile_options(
        "codec", cfg=_C(128, 4.0), dtype="float32")),
    "codec-d64-mse2.5-f16": ("tq_codec.cu", cupy_raw_build.compile_options(
        "codec", cfg=_C(64, 2.5), dtype="float16")),
    "attn-d128-mse3.5-gqa4-f16": ("tq_attention.cu", cupy_raw_build.compile_options(
        "attention", k_cfg=_C(128, 3.5), v_cfg=_C(128, 3.5, seed=1), dtype="float16",
        tail_dtype="bfloat16", group=4)),
    "attn-d64-prod3-mse2.5-gqa1-f32": ("tq_attention.cu", cupy_raw_build.compile_options(
        "attention", k_cfg=_C(64, 3.0, "prod"), v_cfg=_C(64, 2.5), dtype="float32",
        tail_dtype="float32", group=1)),
    "attn-d128-prod3.5-gqa12-bf16": ("tq_attention.cu", cupy_raw_build.compile_options(
        "attention", k_cfg=_C(128, 3.5, "prod"), v_cfg=_C(128, 3.5, "prod"), dtype="bfloat16",
        tail_dtype="float16", group=12)),
    "paged-d128-mse3.5-gqa4-bf16-packed": ("tq_paged.cu", _PAGED(
        "attention", k_cfg=_C(128, 3.5), v_cfg=_C(128, 3.5, seed=1), dtype="bfloat16",
        new_dtype="bfloat16", raw_dtype="bfloat16", out_dtype="bfloat16", group=4, block_size=16,
        layout=cupy_paged.Layout(True, 120, 120, 60))),
    "paged-d64-prod2.5-gqa12-f16-apart-b32": ("tq_paged.cu", _PAGED(
        "attention", k_cfg=_C(64, 2.5, "prod"), v_cfg=_C(64, 2.5, "prod", seed=1), dtype="float16",
        new_dtype="float16", raw_dtype="float32", out_dtype="float32", group=12, block_size=32,
        layout=cupy_paged.Layout(False, 28, 28, 0))),
    "paged-d64-mse4-mse2.5-gqa1-f32-packed": ("tq_paged.cu", _PAGED(
        "attention", k_cfg=_C(64, 4.0), v_cfg=_C(64, 2.5, seed=1), dtype="float32",
        new_dtype="float32", raw_dtype="float16", out_dtype="float16", group=1, block_size=16,
        layout=cupy_paged.Layout(True, 60, 60, 36))),
    # Other split / raw-partial shapes than the defaults (CupyPagedTuning).
    "paged-d128-mse3.5-gqa4-f16-packed-w8-tpw8": ("tq_paged.cu", _PAGED(
        "attention", k_cfg=_C(128, 3.5), v_cfg=_C(128, 3.5, seed=1), dtype="float16",
        new_dtype="float16", raw_dtype="float16", out_dtype="float16", group=4, block_size=16,
        layout=cupy_paged.Layout(True, 120, 120, 60),
        tuning=CupyPagedTuning(split_warps=8, tiles_per_warp=8, raw_scan=1, raw_u=2))),
    "paged-write-d128-mse3.5-bf16": ("tq_paged.cu", _PAGED(
        "write", k_cfg=_C(128, 3.5), v_cfg=_C(128, 3.5, seed=1), new_dtype="bfloat16",
        raw_dtype="float16")),
}


def _compile(source: str, options: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    # sm_90a as the backend builds it (NVRTC -arch=sm_90a) for the cases named so.
    arch = "-gencode=arch=compute_90a,code=sm_90a" if out.stem.endswith("-sm90a") else "-arch=sm_90"
    cmd = [NVCC, "-cubin", arch, "-std=c++17", "-Werror", "all-warnings",
           f"-I{cupy_raw_build.CUDA_DIR}", *options, "-o", str(out), str(cupy_raw_build.CUDA_DIR / source)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_every_source_is_covered() -> None:
    on_disk = {p.name for p in cupy_raw_build.CUDA_DIR.glob("*.cu")}
    assert on_disk == {src for src, _ in CASES.values()} == set(cupy_raw_build.SOURCES)


def test_sources_compile_for_sm90(tmp_path: Path) -> None:
    if NVCC is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nvcc not found on a CI machine")
        pytest.skip("nvcc not installed")
    names = list(CASES)
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda k: _compile(*CASES[k], tmp_path / f"{k}.cubin"), names))
    failures = [f"{k}:\n{r.stdout}{r.stderr}" for k, r in zip(names, results, strict=False)
                if r.returncode or "warning" in (r.stdout + r.stderr).lower()]
    assert not failures, "\n".join(failures)
