"""Fast checks, no engine: TQ_* parsing and validation, version gate, raw pool map, standalone impl."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from turboquant_vllm import DEFAULTS, ConfigError, TurboQuantConfig, check_vllm_version, vllm_version
from turboquant_vllm.raw_pool import RawSlotManager, blocks_per_seq


def test_defaults_in_one_place():
    cfg = TurboQuantConfig.from_env({})
    assert (cfg.k_mode, cfg.v_mode, cfg.k_bits, cfg.v_bits) == ("mse", "mse", 3.5, 3.5)
    assert cfg.raw_window == DEFAULTS["raw_window"] == 128
    assert cfg.sink_tokens == DEFAULTS["sink_tokens"] == 4
    assert cfg == TurboQuantConfig()
    assert cfg.state_bytes(64) == 64  # 32-byte K and V records at d=64: 4x fewer bytes than bf16


def test_original_names_and_qjl():
    cfg = TurboQuantConfig.from_env({"TQ_B_MSE": "2.5", "TQ_B_QJL": "1", "TQ_RAW_WINDOW": "64"})
    assert (cfg.k_mode, cfg.k_bits, cfg.v_mode, cfg.v_bits) == ("prod", 3.5, "mse", 2.5)
    assert cfg.raw_window == 64
    cfg = TurboQuantConfig.from_env({"TQ_K_BITS": "4", "TQ_V_BITS": "3", "TQ_SINK_TOKENS": "0",
                                     "TQ_SEED": "7", "TQ_RAW_WINDOW": "0"})
    assert (cfg.k_bits, cfg.v_bits, cfg.sink_tokens, cfg.seed, cfg.raw_window) == (4, 3, 0, 7, 0)


def test_variables_read_outside_the_config_come_from_config():
    from turboquant_vllm.config import ENV_VARS, marker_file, platform_disabled

    assert marker_file({}) is None and marker_file({"TQ_MARKER_FILE": " /x/y.jsonl "}) == "/x/y.jsonl"
    assert not platform_disabled({}) and not platform_disabled({"TQ_DISABLE_PLATFORM": "0"})
    assert platform_disabled({"TQ_DISABLE_PLATFORM": "1"})
    assert {"TQ_MARKER_FILE", "TQ_DISABLE_PLATFORM", "TQ_RAW_WINDOW", "TQ_FLUSH_INTERVAL"} <= set(ENV_VARS)


def test_old_window_name_still_read_with_a_deprecation_warning(caplog):
    with caplog.at_level("WARNING", logger="vllm.turboquant_vllm"):
        cfg = TurboQuantConfig.from_env({"TQ_FLUSH_INTERVAL": "64"})
    assert cfg.raw_window == 64
    assert "TQ_FLUSH_INTERVAL is deprecated" in caplog.text and "TQ_RAW_WINDOW" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm.turboquant_vllm"):
        assert TurboQuantConfig.from_env({"TQ_RAW_WINDOW": "32"}).raw_window == 32
    assert "deprecated" not in caplog.text
    assert TurboQuantConfig.from_env({"TQ_RAW_WINDOW": "16", "TQ_FLUSH_INTERVAL": "16"}).raw_window == 16
    with pytest.raises(ConfigError, match=r"TQ_RAW_WINDOW=16 and TQ_FLUSH_INTERVAL=64 disagree"):
        TurboQuantConfig.from_env({"TQ_RAW_WINDOW": "16", "TQ_FLUSH_INTERVAL": "64"})


def test_rotation_reaches_every_layer_codec():
    from turboquant_vllm.backend import make_codecs

    cfg = TurboQuantConfig.from_env({"TQ_ROTATION": "hadamard2"})
    assert cfg.rotation == "hadamard2" and "rotation hadamard2" in cfg.describe()
    k, v = make_codecs(cfg, 64, 5)
    assert k.config.rotation == v.config.rotation == "hadamard2" and k.config.seed != v.config.seed
    assert TurboQuantConfig.from_env({}).rotation == "haar"
    with pytest.raises(ConfigError, match="power-of-two"):
        TurboQuantConfig.from_env({"TQ_ROTATION": "hadamard"}).validate(head_dim=96)


@pytest.mark.parametrize(("env", "named"), [
    ({"TQ_B_MSE": "abc"}, "TQ_B_MSE"),
    ({"TQ_B_MSE": "7"}, "TQ_B_MSE"),
    ({"TQ_B_QJL": "2"}, "TQ_B_QJL"),
    ({"TQ_B_QJL": "1", "TQ_K_MODE": "mse"}, "TQ_B_QJL"),
    ({"TQ_K_BITS": "1.25"}, "TQ_K_BITS"),
    ({"TQ_V_MODE": "fp8"}, "TQ_V_MODE"),
    ({"TQ_RAW_WINDOW": "-1"}, "TQ_RAW_WINDOW"),
    ({"TQ_RAW_WINDOW": "1e3"}, "TQ_RAW_WINDOW"),
    ({"TQ_FLUSH_INTERVAL": "-1"}, "TQ_FLUSH_INTERVAL"),
    ({"TQ_SINK_TOKENS": "x"}, "TQ_SINK_TOKENS"),
    ({"TQ_SEED": "-3"}, "TQ_SEED"),
    ({"TQ_NUM_KV_HEADS": "0"}, "TQ_NUM_KV_HEADS"),
    ({"TQ_HEAD_DIM": "60"}, "TQ_HEAD_DIM"),
    ({"TQ_DEVICE": "tpu"}, "TQ_DEVICE"),
    ({"TQ_CODEC_BACKEND": "nope"}, "TQ_CODEC_BACKEND"),
    ({"TQ_RAW_SEQS": "-2"}, "TQ_RAW_SEQS"),
    ({"TQ_ROTATION": "dct"}, "TQ_ROTATION"),
    ({"TQ_ROTATION": "hadamard", "TQ_HEAD_DIM": "96"}, "TQ_HEAD_DIM"),
])
def test_invalid_values_name_the_variable(env, named):
    with pytest.raises(ConfigError, match=named):
        TurboQuantConfig.from_env(env)


def test_shape_disagreement_names_both_values():
    cfg = TurboQuantConfig.from_env({"TQ_NUM_KV_HEADS": "4", "TQ_HEAD_DIM": "64"})
    with pytest.raises(ConfigError, match=r"TQ_NUM_KV_HEADS=4.*num_kv_heads=3"):
        cfg.validate(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    with pytest.raises(ConfigError, match=r"TQ_DEVICE='cuda'.*'cpu'"):
        TurboQuantConfig.from_env({"TQ_DEVICE": "cuda"}).validate(device="cpu")
    filled = TurboQuantConfig.from_env({"TQ_NUM_LAYERS": "30"}).validate(num_layers=30, num_kv_heads=3,
                                                                         head_dim=64)
    assert (filled.num_layers, filled.num_kv_heads, filled.head_dim) == (30, 3, 64)


def test_validated_against_a_vllm_config(monkeypatch):
    from turboquant_vllm import sizing

    hf = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9)
    mc = SimpleNamespace(hf_text_config=hf, get_head_size=lambda: 64, get_total_num_kv_heads=lambda: 3,
                         max_model_len=2048)
    vc = SimpleNamespace(model_config=mc, parallel_config=SimpleNamespace(),
                         device_config=SimpleNamespace(device_type="cpu"))
    monkeypatch.setattr(sizing, "env_config", lambda: TurboQuantConfig.from_env({"TQ_NUM_LAYERS": "32"}))
    with pytest.raises(ConfigError, match=r"TQ_NUM_LAYERS=32.*num_layers=30"):
        sizing.validated_config(vc)
    monkeypatch.setattr(sizing, "env_config", lambda: TurboQuantConfig.from_env({"TQ_MAX_SEQ_LEN": "2048"}))
    assert sizing.validated_config(vc).num_kv_heads == 3


def test_version_gate():
    check_vllm_version(vllm_version())  # the installed one (0.32.x) is supported
    check_vllm_version((0, 32, 5))
    for bad in [(0, 31, 2), (0, 33, 0), (1, 0, 0), (0, 0, "dev")]:
        with pytest.raises(RuntimeError, match=r">=0\.32\.0,<0\.33\.0"):
            check_vllm_version(bad)


def test_register_fills_the_custom_slot():
    import turboquant_vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    turboquant_vllm.register()
    turboquant_vllm.register()  # idempotent
    assert AttentionBackendEnum.CUSTOM.get_path() == turboquant_vllm.BACKEND_QUALNAME
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend.get_name() == "CUSTOM"  # vLLM 0.32 requires the slot's enum name here
    assert "TURBOQUANT" not in backend.__qualname__.upper()


def test_raw_pool_grants_fresh_blocks_only_and_drops_stale_copies():
    assert blocks_per_seq(16, 128, 4) == 10
    m = RawSlotManager(num_blocks=32, num_raw_blocks=10, block_size=4, window=8, sink_tokens=1)
    bt = torch.tensor([[5, 6, 7, 8, 9, -1]], dtype=torch.int32)
    # Prefill 18 tokens (blocks 5..9): the sink block 5 and window blocks 7, 8, 9 get rows, 6 does not.
    m.step(bt, torch.tensor([18]), torch.tensor([18]))
    assert sorted(m._row_of) == [5, 7, 8, 9]
    # A prefix-cache hit on blocks 5, 6 by another request that writes block 10 onwards.
    bt2 = torch.tensor([[5, 6, 10, -1, -1, -1]], dtype=torch.int32)
    m.step(bt2, torch.tensor([10]), torch.tensor([2]))
    assert 6 not in m._row_of and 10 in m._row_of  # 6 was written before: it stays compressed
    # Block 7 freed and reused from offset 0 by a request that does not need it raw: its copy is dropped.
    bt3 = torch.tensor([[11, 12, 13, 7, 14, 15, 16]], dtype=torch.int32)
    m.step(bt3, torch.tensor([28]), torch.tensor([28]))
    assert int(m.raw_slot_of_block[7]) == -1 and m.stats["stale_dropped"] >= 1


def test_standalone_impl_matches_exact_attention_inside_the_window():
    from turboquant_vllm import TurboQuantAttentionImpl

    torch.manual_seed(0)
    cfg = TurboQuantConfig(raw_window=512, max_seq_len=512)
    impl = TurboQuantAttentionImpl(num_heads=6, head_size=64, scale=0.125, num_kv_heads=2, tq_config=cfg,
                                   layer_idx=0)
    q, k, v = torch.randn(50, 6, 64), torch.randn(50, 2, 64), torch.randn(50, 2, 64)
    out = torch.cat([impl.forward(q[:40], k[:40], v[:40]), impl.forward(q[40:], k[40:], v[40:])])
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    logits = torch.einsum("qhd,khd->hqk", q, kk) * 0.125
    logits = logits.masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", logits.softmax(-1), vv)
    assert torch.allclose(out, ref, atol=1e-4)
    # Without the window (quantize on write) the past is read compressed: close, not exact.
    impl2 = TurboQuantAttentionImpl(num_heads=6, head_size=64, scale=0.125, num_kv_heads=2, layer_idx=0,
                                    tq_config=TurboQuantConfig(raw_window=0, sink_tokens=0))
    out2 = torch.cat([impl2.forward(q[:40], k[:40], v[:40]), impl2.forward(q[40:], k[40:], v[40:])])
    err = (out2[40:] - ref[40:]).norm() / ref[40:].norm()
    assert 0 < err < 0.3


# ------------------------------------------------------------------------------- raw pool sizing
# SmolLM2-135M in bf16 at block size 16, window 128, 4 sinks: 9 window blocks + 1 sink block per
# sequence; one block of all 30 layers, K and V, is 2 * 30 * 16 * 3 * 64 * 2 = 368,640 bytes.
SMOL = dict(block_size=16, num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=2)
SMOL_SEQ_BYTES = 10 * 368_640


def test_raw_pool_fits_the_share_of_the_budget_instead_of_refusing():
    from turboquant_vllm.sizing import plan_raw_pool

    budget = 256 * 2**20
    # vLLM's default max_num_seqs (256 here) would need 900 MiB: the pool takes whole sequences up to
    # a tenth of the budget instead, and says how many it covers.
    res = plan_raw_pool(TurboQuantConfig(), budget_bytes=budget, max_num_seqs=256, **SMOL)
    assert res.blocks_per_seq == 10 and res.bytes_per_seq == SMOL_SEQ_BYTES
    assert res.seqs_covered == int(0.1 * budget) // SMOL_SEQ_BYTES == 7
    assert res.num_raw_blocks == 70 and res.bytes == 7 * SMOL_SEQ_BYTES <= 0.1 * budget
    assert res.raw_seqs == 256
    line = res.describe()
    assert "7 of 256 sequences" in line and "TQ_RAW_SHARE=0.1" in line and "compressed" in line
    # Few sequences: all covered, the share is a cap, not a target.
    small = plan_raw_pool(TurboQuantConfig(), budget_bytes=budget, max_num_seqs=4, **SMOL)
    assert (small.seqs_covered, small.num_raw_blocks, small.bytes) == (4, 40, 4 * SMOL_SEQ_BYTES)
    assert "compressed" not in small.describe()


@pytest.mark.parametrize(("env", "covered"), [
    ({"TQ_RAW_SHARE": "0.5"}, 36),           # 128 MiB // 3.5 MiB
    ({"TQ_RAW_SHARE": "0"}, 0),              # no window at all, the engine still starts
    ({"TQ_RAW_SEQS": "3"}, 3),               # fewer sequences asked for than fit
    ({"TQ_RAW_SEQS": "100"}, 7),             # more asked for than fit: capped by the share
    ({"TQ_RAW_WINDOW": "0", "TQ_SINK_TOKENS": "0"}, 0),
])
def test_raw_pool_knobs(env, covered):
    from turboquant_vllm.sizing import plan_raw_pool

    res = plan_raw_pool(TurboQuantConfig.from_env(env), budget_bytes=256 * 2**20, max_num_seqs=256, **SMOL)
    assert res.seqs_covered == covered
    assert res.num_raw_blocks == covered * res.blocks_per_seq
    assert res.bytes == res.num_raw_blocks * 368_640


def test_raw_pool_budget_smaller_than_one_sequence_gives_an_empty_pool():
    from turboquant_vllm.sizing import plan_raw_pool

    res = plan_raw_pool(TurboQuantConfig(), budget_bytes=30 * 2**20, max_num_seqs=256, **SMOL)
    assert (res.seqs_covered, res.num_raw_blocks, res.bytes) == (0, 0, 0)
    assert "0 of 256 sequences" in res.describe()


@pytest.mark.parametrize("bad", ["1", "1.5", "-0.1", "nan", "lots"])
def test_raw_share_out_of_range_names_the_variable(bad):
    with pytest.raises(ConfigError, match="TQ_RAW_SHARE"):
        TurboQuantConfig.from_env({"TQ_RAW_SHARE": bad})


def _vllm_config(tp: int, max_num_seqs: int = 256, kv_bytes: int | None = None, blocks: int | None = None):
    """A stand-in for vLLM's config of a 4-KV-head model at tensor-parallel size ``tp``."""
    mc = SimpleNamespace(get_num_layers=lambda pc: 2, get_head_size=lambda: 64, dtype=torch.bfloat16,
                         get_num_kv_heads=lambda pc: 4 // pc.tensor_parallel_size)
    return SimpleNamespace(model_config=mc, parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           cache_config=SimpleNamespace(block_size=16, kv_cache_memory_bytes=kv_bytes,
                                                        num_gpu_blocks=blocks),
                           scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))


def test_raw_reservation_per_rank_and_kept_for_the_builder(monkeypatch):
    from turboquant_vllm import sizing

    monkeypatch.setattr(sizing, "env_config", lambda: TurboQuantConfig())
    monkeypatch.setattr(sizing, "_chosen", None)
    budget = 8 * 2**20
    # One block of 2 layers, K and V, per rank: 2 * 2 * 16 * heads * 64 * 2 bytes; 10 blocks a sequence.
    per_seq = {1: 10 * 2 * 2 * 16 * 4 * 64 * 2, 2: 10 * 2 * 2 * 16 * 2 * 64 * 2}
    for tp in (1, 2):
        monkeypatch.setattr(sizing, "_chosen", None)
        res = sizing.raw_reservation(_vllm_config(tp), budget_bytes=budget)
        assert res.num_kv_heads == 4 // tp and res.bytes_per_seq == per_seq[tp]
        assert res.seqs_covered == int(0.1 * budget) // per_seq[tp]
        # The builder asks without a budget and gets the worker's choice, not a fresh (uncapped) one.
        assert sizing.raw_reservation(_vllm_config(tp)) is res
    assert per_seq[1] == 2 * per_seq[2]  # a rank holds half the heads: twice the sequences fit


def test_raw_reservation_without_a_worker_choice_caps_by_the_known_budget(monkeypatch):
    from turboquant_vllm import sizing

    monkeypatch.setattr(sizing, "env_config", lambda: TurboQuantConfig())
    monkeypatch.setattr(sizing, "_chosen", None)
    per_seq = 10 * 2 * 2 * 16 * 4 * 64 * 2
    res = sizing.raw_reservation(_vllm_config(1, kv_bytes=64 * 2**20))
    assert res.seqs_covered == int(0.1 * 64 * 2**20) // per_seq
    # No --kv-cache-memory-bytes: the compressed pool's size (blocks x 64-byte slots) is the budget.
    res = sizing.raw_reservation(_vllm_config(1, blocks=4096))
    assert res.budget_bytes == 4096 * 16 * 2 * 4 * 64
    assert res.seqs_covered == int(0.1 * res.budget_bytes) // per_seq
    assert sizing._chosen is None  # only the worker's call is remembered
