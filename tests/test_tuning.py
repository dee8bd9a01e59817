"""Tuning settings (``turboquant_codec.tuning``): defaults, the environment, and that a changed
setting builds and plans its own cache entries. Host-only: builds are counted with the compiler
replaced, plans are pure arithmetic, Numba kernels are made (not launched) on the simulator."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from turboquant_codec import tuning
from turboquant_codec.backends import (
    cupy_paged,
    cupy_raw_attn,
    cupy_raw_build,
    cupy_raw_device,
    cupy_raw_tables,
)
from turboquant_codec.config import CodecConfig
from turboquant_codec.paged_cache import PagedCache
from turboquant_codec.tuning import CupyPagedTuning, CupyRawTuning, HostTuning, NumbaCudaTuning, Tuning


def test_defaults_are_the_tuned_values() -> None:
    assert dataclasses.astuple(CupyRawTuning()) == (16, 4, 1, None, None, 12, None, "auto")
    assert dataclasses.astuple(CupyPagedTuning()) == (16, 32, 4, 2, 4, 128, 128, 8192, 256)
    assert dataclasses.astuple(NumbaCudaTuning()) == (None, False)
    assert dataclasses.astuple(HostTuning()) == ("auto",)
    assert tuning.from_env({}) == Tuning()


def test_environment_is_read_into_settings() -> None:
    got = tuning.from_env({"TQ_CUPY_RAW_WGMMA": "0", "TQ_CUPY_RAW_ENCODE": "scalar"}).cupy_raw
    assert (got.enc_tc_wgmma, got.encode_path) == (False, "scalar")
    assert tuning.from_env({"TQ_CUPY_RAW_WGMMA": "1"}).cupy_raw.enc_tc_wgmma is True
    with pytest.raises(ValueError, match="TQ_CUPY_RAW_WGMMA must be 0 or 1"):
        tuning.from_env({"TQ_CUPY_RAW_WGMMA": "yes"})
    with pytest.raises(ValueError, match="TQ_CUPY_RAW_ENCODE must be one of"):
        tuning.from_env({"TQ_CUPY_RAW_ENCODE": "fast"})
    assert tuning.requested_backend({}) == tuning.requested_backend({"TQ_BACKEND": ""}) == "auto"
    assert tuning.requested_backend({"TQ_BACKEND": "numpy"}) == "numpy"


def test_bad_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="attn_warps must be a positive int"):
        CupyRawTuning(attn_warps=0)
    with pytest.raises(ValueError, match="attn_stages must be >= 2"):
        CupyRawTuning(attn_stages=1)
    with pytest.raises(ValueError, match="encode_path must be one of"):
        CupyRawTuning(encode_path="tc")
    with pytest.raises(ValueError, match="tiles_per_warp must be <= 32"):
        CupyPagedTuning(tiles_per_warp=33)
    with pytest.raises(ValueError, match="side_row_threads must be a multiple of 32 and at most"):
        CupyPagedTuning(split_warps=2, side_row_threads=128)
    with pytest.raises(ValueError, match="generic_rows must be a positive int"):
        CupyPagedTuning(generic_rows=0)
    with pytest.raises(ValueError, match="attn_max_registers"):
        NumbaCudaTuning(attn_max_registers=-1)
    with pytest.raises(TypeError, match="Tuning.cupy_raw must be a CupyRawTuning"):
        Tuning(cupy_raw=NumbaCudaTuning())  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CupyRawTuning().attn_warps = 8  # type: ignore[misc]


def test_using_replaces_and_restores() -> None:
    before = tuning.current()
    with tuning.using(cupy_raw=CupyRawTuning(attn_warps=8)) as inside:
        assert tuning.current() is inside
        assert inside.cupy_raw.attn_warps == 8 and inside.numba_cuda is before.numba_cuda
    assert tuning.current() is before


def test_a_changed_attention_setting_builds_its_own_module(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[str, ...]] = []

    def build(device, source, options):
        built.append(options)
        return SimpleNamespace(options=options)

    monkeypatch.setattr(cupy_raw_build, "module", build)
    cfg = CodecConfig(128, 3.5, seed=11)  # a seed no other test builds with
    args = (0, cfg, cfg, "float16", "float32", 4)
    default, eight, deep = CupyRawTuning(), CupyRawTuning(attn_warps=8), CupyRawTuning(attn_stages=3)
    mods = [cupy_raw_build.attention_module(*args, t) for t in (default, eight, deep, CupyRawTuning())]
    assert len(built) == 3 and mods[3] is mods[0]  # an equal settings object finds the same build
    assert "-DNWARPS=16" in mods[0].options and "-DSTAGES=4" in mods[0].options
    assert "-DNWARPS=8" in mods[1].options and "-DSTAGES=3" in mods[2].options
    with tuning.using(cupy_raw=eight):  # the default argument is the settings in force
        options = cupy_raw_build.compile_options("attention", k_cfg=cfg, v_cfg=cfg, dtype="float16", group=4)
        assert "-DNWARPS=8" in options


def test_a_changed_attention_setting_plans_its_own_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cupy_raw_device, "sm_count", lambda device: 132)
    n = 1 << 17
    for settings in (CupyRawTuning(), CupyRawTuning(attn_warps=8)):
        per_warp, parts = cupy_raw_attn.attention_plan(8, n, 0, settings)
        blocks = -(-parts // settings.attn_warps)
        assert per_warp * parts >= n // cupy_raw_attn.TILE and blocks * settings.attn_warps >= parts
    assert cupy_raw_attn.attention_plan(8, n, 0, CupyRawTuning()) != cupy_raw_attn.attention_plan(
        8, n, 0, CupyRawTuning(attn_warps=8))


def test_a_changed_numba_setting_makes_its_own_kernel() -> None:
    pytest.importorskip("numba")
    from turboquant_codec.backends import numba_warp_attention as nw

    cfg = CodecConfig(64, 3.5, seed=12)
    default = nw.fast_attention_kernel(cfg, cfg, 2, NumbaCudaTuning())
    prefetch = nw.fast_attention_kernel(cfg, cfg, 2, NumbaCudaTuning(attn_prefetch=True))
    assert default is not None and prefetch is not None
    assert default is nw.fast_attention_kernel(cfg, cfg, 2, NumbaCudaTuning())
    assert prefetch[0] is not default[0]
    with tuning.using(numba_cuda=NumbaCudaTuning(attn_prefetch=True)):
        assert nw.fast_attention_kernel(cfg, cfg, 2) is prefetch


def test_a_changed_paged_setting_builds_plans_and_keys_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """cupy_paged's build, plan and launch key follow the CupyPagedTuning passed (or in force): an
    equal settings object shares them, a changed one gets its own."""
    built: list[tuple[str, ...]] = []

    def build(device, source, options):
        built.append(options)
        kernel = SimpleNamespace(kernel=len(built))
        return SimpleNamespace(options=options, get_function=lambda name: kernel)

    monkeypatch.setattr(cupy_raw_build, "module", build)
    monkeypatch.setattr(cupy_raw_tables, "device_tables", lambda device, cfg: (None, None))
    cfg = CodecConfig(128, 3.5, seed=13)  # a seed no other test plans with
    layout = cupy_paged.Layout(True, 120, 120, 60)
    args = (0, cfg, cfg, "float16", "float16", "float16", "float16", 4, 16, layout)
    default, short, equal = CupyPagedTuning(), CupyPagedTuning(tiles_per_warp=8), CupyPagedTuning()
    plans = [cupy_paged._plan(*args, t) for t in (default, short, equal)]
    assert len(built) == 2 and plans[2] is plans[0] and plans[1] is not plans[0]
    assert "-DTPW=32" in built[0] and "-DTPW=8" in built[1]
    narrow = CupyPagedTuning(split_warps=8, raw_scan=1)
    assert cupy_paged.raw_part(narrow) == 256 and cupy_paged.raw_part(default) == 1024
    assert cupy_paged._raw_smem(4, 128, narrow) < cupy_paged._raw_smem(4, 128, default)
    with tuning.using(cupy_paged=short):  # the default argument is the settings in force
        assert "-DTPW=8" in cupy_paged.compile_options(
            "attention", k_cfg=cfg, v_cfg=cfg, dtype="float16", new_dtype="float16", raw_dtype="float16",
            out_dtype="float16", group=4, block_size=16, layout=layout)
    cache = PagedCache(None, None, cfg, cfg)  # no arrays: the key's settings part alone

    def key(t: CupyPagedTuning) -> tuple:
        return cupy_paged._decode_sig(cache, None, None, None, None, None, 0.125, None, 4, 0, t)

    assert key(default) == key(equal) and key(default) != key(short)
    assert key(CupyPagedTuning(side_min_streams=1)) != key(default)  # launch shape only, same build
