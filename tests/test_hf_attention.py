"""The registered ``"turboquant"`` attention with ``TurboQuantCache`` on tiny random Llama and Qwen3
models (CPU): against ``DynamicCache`` where nothing is compressed (bitwise), against the
decoded-copy cache where it is, with left padding, sampling and beam search.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from turboquant_torch import hf_attention  # noqa: E402
from turboquant_torch.baselines import DecodedCopyCache  # noqa: E402
from turboquant_torch.hf_cache import CACHE_ARG, TurboQuantCache  # noqa: E402

ALL_RAW = 10**6
CACHE = CACHE_ARG
SHAPE = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, pad_token_id=0)


def _model(kind: str = "llama"):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, max_position_embeddings=512))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE))
    return hf_attention.use(model.eval())


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


@pytest.fixture(scope="module")
def padded():
    """Two rows, left-padded: (input_ids (2, 33), attention_mask, row 0 (1, 20), row 1 (1, 33))."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, 128, (1, 20), generator=g), torch.randint(1, 128, (1, 33), generator=g)
    ids = torch.zeros(2, 33, dtype=torch.long)
    ids[0, 13:], ids[1] = a[0], b[0]
    mask = torch.ones_like(ids)
    mask[0, :13] = 0
    return ids, mask, a, b


def _gen(model, ids, mask, cache, n=16, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              **{CACHE: cache}, **kw)


@pytest.fixture
def paged_calls(monkeypatch):
    """Counts the layer steps that ran the paged op, the CUDA graph replays among them, and the
    host decoder's calls: a step runs the op through a layer's decoder on the host, the op itself,
    or (CUDA) the layer's graph."""
    from turboquant_codec import PagedDecoder

    calls = [0, 0, 0]  # layer steps, graph replays, host decoder calls
    monkeypatch.setattr(hf_attention, "_paged", _counting(hf_attention._paged, calls, 0))
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", _counting(torch.cuda.CUDAGraph.replay, calls, 1))
    monkeypatch.setattr(PagedDecoder, "__call__", _counting(PagedDecoder.__call__, calls, 2))
    return calls


def _counting(real, calls: list[int], i: int):
    """``real``, adding one to ``calls[i]`` at every call."""
    def call(*args, **kwargs):
        calls[i] += 1
        return real(*args, **kwargs)
    return call


def test_registered_under_one_name() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["turboquant"] is hf_attention.turboquant_attention
    assert "turboquant" in AttentionMaskInterface._global_mapping


def test_padded_batch_all_raw_equals_dynamic_cache(model, padded) -> None:
    ids, mask, _, _ = padded
    expected = _gen(model, ids, mask, DynamicCache(config=model.config))
    ours = _gen(model, ids, mask, TurboQuantCache(model.config, flush_interval=ALL_RAW))
    assert torch.equal(ours, expected)


def test_beam_search_all_raw_equals_dynamic_cache(llama, padded) -> None:
    ids, mask, _, _ = padded
    kw = dict(num_beams=3, do_sample=False, n=10)
    expected = _gen(llama, ids, mask, DynamicCache(config=llama.config), **kw)
    assert torch.equal(_gen(llama, ids, mask, TurboQuantCache(llama.config, flush_interval=ALL_RAW), **kw),
                       expected)


def test_sampling_all_raw_equals_dynamic_cache(llama, padded) -> None:
    ids, mask, _, _ = padded
    out = []
    for cache in (DynamicCache(config=llama.config), TurboQuantCache(llama.config, flush_interval=ALL_RAW)):
        torch.manual_seed(5)
        out.append(_gen(llama, ids, mask, cache, do_sample=True, top_k=20))
    assert torch.equal(out[0], out[1])


@torch.no_grad()
def test_decode_steps_read_records_like_the_decoded_copy(model, paged_calls) -> None:
    """Chunked prefill (dense path: bitwise) then one-token steps on the paged op (float32
    rounding of the same numbers), with flushes during decoding and a sink block that mixes raw
    and compressed tokens."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (2, 60), generator=g)
    kw = dict(flush_interval=8, sinks=5)
    ours, ref = TurboQuantCache(model.config, **kw), DecodedCopyCache(model.config, **kw)
    for s in range(0, 30, 10):
        a = model(input_ids=ids[:, s : s + 10], **{CACHE: ours}).logits
        assert torch.equal(a, model(input_ids=ids[:, s : s + 10], **{CACHE: ref}).logits)
    worst = 0.0
    for t in range(30, 60):
        a = model(input_ids=ids[:, t : t + 1], **{CACHE: ours}).logits
        b = model(input_ids=ids[:, t : t + 1], **{CACHE: ref}).logits
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    assert paged_calls[0] == paged_calls[2] == 30 * model.config.num_hidden_layers  # the host decoder
    assert worst < 1e-5
    assert ours.memory().decoded == 0 and ref.memory().decoded > 0


def test_greedy_matches_decoded_copy(model) -> None:
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    one = torch.ones_like(ids)
    for bits in (3.5, 4.0):
        kw = dict(flush_interval=8, key_bits=bits, value_bits=bits)
        expected = _gen(model, ids, one, DecodedCopyCache(model.config, **kw), n=24)
        assert torch.equal(_gen(model, ids, one, TurboQuantCache(model.config, **kw), n=24), expected)


@pytest.mark.parametrize("plan_tokens", [None, 3], ids=["to-flush", "short-plans"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["host", "device-branch"])
@torch.no_grad()
def test_new_raw_blocks_keep_the_fast_path(dtype, plan_tokens, paged_calls, monkeypatch) -> None:
    """Rows of different lengths (left padding) cross block boundaries at different steps; the
    prefill's commit maps each row's raw blocks up to its next flush, so no one-token step between
    flushes takes the general commit or changes the raw-block map, and each row reads what the
    decoded-copy cache reads for that row alone (integer bits: no calibration shared between rows).
    With plans shorter than the flush interval (``PLAN_TOKENS`` 3: two steps each) the fast path
    plans again at each plan's end and maps the blocks then, still without a general commit."""
    from turboquant_torch import hf_cache
    from turboquant_torch.hf_cache import TurboQuantLayer

    if plan_tokens is not None:
        monkeypatch.setattr(hf_cache, "PLAN_TOKENS", plan_tokens)
    model = _model("llama").to(dtype)
    steps, pad = 16, 10
    ids = torch.randint(1, 128, (2, 50 + steps), generator=torch.Generator().manual_seed(4))
    ids[0, :pad] = 0
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # row 0: 40 real prompt tokens, row 1: 50
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    # flush 32, 4 sinks, 16-token blocks: both rows compress 32 tokens at the prefill and flush
    # again only after 16 more steps; row 0 opens block 3 at position 48 (step 8, counting from 0),
    # row 1 block 4 at position 64 (step 14).
    kw = dict(flush_interval=32, sinks=4, key_bits=4.0, value_bits=4.0)
    ours = TurboQuantCache(model.config, **kw)
    alone = [DecodedCopyCache(model.config, **kw) for _ in range(2)]
    first = [pad, 0]  # each row's first real column
    model(input_ids=ids[:, :50], attention_mask=mask[:, :50], position_ids=pos[:, :50], **{CACHE: ours})
    for r, cache in enumerate(alone):
        model(input_ids=ids[r : r + 1, first[r] : 50], **{CACHE: cache})
    general = [0]
    monkeypatch.setattr(TurboQuantLayer, "_commit", _counting(TurboQuantLayer._commit, general, 0))
    worst, mapped = 0.0, ours.layers[0].raw_of.copy()
    opened = ours.layers[0].raw_of[[0, 1], [3, 4]]  # the blocks the steps open: mapped ahead or not
    assert (opened >= 0).all() if plan_tokens is None else (opened < 0).all()
    for t in range(50, 50 + steps):
        a = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                  position_ids=pos[:, t : t + 1], **{CACHE: ours}).logits.float()
        for r, cache in enumerate(alone):
            b = model(input_ids=ids[r : r + 1, t : t + 1], **{CACHE: cache}).logits.float()
            worst = max(worst, float((a[r] - b[0]).abs().max() / b.abs().max()))
        _assert_step_state(ours.layers[0])
        if plan_tokens is None:
            assert np.array_equal(ours.layers[0].raw_of, mapped)
    assert (ours.layers[0].raw_of[[0, 1], [3, 4]] >= 0).all()
    layers = model.config.num_hidden_layers
    assert list(ours.layers[0].n) == [40 + steps, 50 + steps]
    assert (ours.layers[0].c == 36).all()  # no flush during the steps
    assert general[0] == 0
    assert paged_calls[0] == steps * layers
    assert worst < (1e-5 if dtype == torch.float32 else 2.0**-6)


def test_left_padding_is_not_stored(llama, padded, paged_calls) -> None:
    """At integer bits (no calibration shared by rows) a padded row generates what it does alone."""
    ids, mask, a, b = padded
    kw = dict(flush_interval=8, key_bits=4.0, value_bits=4.0)
    cache = TurboQuantCache(llama.config, **kw)
    both = _gen(llama, ids, mask, cache)
    assert paged_calls[0] > 0
    assert list(cache.layers[0].n) == [20 + 15, 33 + 15]  # real tokens only (the last one not yet stored)
    alone_a = _gen(llama, a, torch.ones_like(a), TurboQuantCache(llama.config, **kw))
    alone_b = _gen(llama, b, torch.ones_like(b), TurboQuantCache(llama.config, **kw))
    assert torch.equal(both[0, 33:], alone_a[0, 20:])
    assert torch.equal(both[1, 33:], alone_b[0, 33:])


@torch.no_grad()
def test_calibration_ignores_padding(llama) -> None:
    """The same rows with and without 13 leading pad tokens choose the same outlier channels (half-
    integer bits: the split that calibration chooses)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 128, (2, 24), generator=g)
    pad = torch.cat([torch.full((2, 13), 7), ids], dim=1)
    pad_mask = torch.cat([torch.zeros(2, 13, dtype=torch.long), torch.ones_like(ids)], dim=1)
    kw = dict(flush_interval=8, key_bits=3.5, value_bits=3.5)
    plain = TurboQuantCache(llama.config, **kw)
    padded_cache = TurboQuantCache(llama.config, **kw)
    llama(input_ids=ids, **{CACHE: plain})
    llama(input_ids=pad, attention_mask=pad_mask, position_ids=(pad_mask.cumsum(-1) - 1).clamp(min=0),
          **{CACHE: padded_cache})
    for x, y in zip(plain.layers, padded_cache.layers, strict=True):
        assert torch.equal(x.kq.codec.channels, y.kq.codec.channels)
        assert torch.equal(x.vq.codec.channels, y.vq.codec.channels)


def test_beam_search_compressed_matches_decoded_copy(llama) -> None:
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(6))
    kw = dict(flush_interval=8, key_bits=4.0, value_bits=4.0)
    gen = dict(num_beams=3, do_sample=False, n=12)
    one = torch.ones_like(ids)
    expected = _gen(llama, ids, one, DecodedCopyCache(llama.config, **kw), **gen)
    assert torch.equal(_gen(llama, ids, one, TurboQuantCache(llama.config, **kw), **gen), expected)


def test_sliding_window_layers_stay_stock() -> None:
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    cfg.layer_types = ["full_attention", "sliding_attention"]
    model = hf_attention.use(transformers.Qwen3ForCausalLM(cfg).eval())
    cache = TurboQuantCache(cfg, flush_interval=ALL_RAW)
    assert type(cache.layers[1]).__name__ == "DynamicSlidingWindowLayer"
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(7))
    one = torch.ones_like(ids)
    assert torch.equal(_gen(model, ids, one, cache), _gen(model, ids, one, DynamicCache(config=cfg)))


def test_other_attention_is_refused(padded) -> None:
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()  # transformers' default attention
    ids, mask, _, _ = padded
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="attn_implementation='turboquant'"):
        warnings.simplefilter("ignore")
        _gen(model, ids, mask, TurboQuantCache(model.config))


def _assert_step_state(layer) -> None:
    """The layer's fast-path bookkeeping agrees with its rows: each row's next position has a raw
    block and the next slot points at it, and a one-token step appends fast exactly when no row's
    buffer would reach the flush interval."""
    rows, bs = np.arange(layer.batch_size), layer.block_size
    blocks = layer.raw_of[rows, layer.n // bs]
    assert (blocks >= 0).all()
    assert np.array_equal(layer._next_slot.cpu().numpy(), blocks * bs + layer.n % bs)
    assert layer._fast_append_next() == (not (layer.n + 1 - layer.c >= layer.flush_interval).any())


def _device_branch_steps(model, ids) -> tuple[float, int, TurboQuantCache]:
    """Chunked prefill then one-token steps of ``ids`` (2, 60) through the paged op's device branch
    (step buffers, one-scatter append), against the decoded-copy cache: (worst relative logit
    difference, steps whose step buffers were the previous step's, our cache). Also checks that
    a step whose raw-block map changed (a new raw block, a flush) without the records growing kept
    the map and length tensors, rewritten in place (the op's kept launches stay valid)."""
    kw = dict(flush_interval=8, sinks=5)
    ours, ref = TurboQuantCache(model.config, **kw), DecodedCopyCache(model.config, **kw)
    for s in range(0, 30, 10):
        a = model(input_ids=ids[:, s : s + 10], **{CACHE: ours}).logits
        torch.testing.assert_close(a, model(input_ids=ids[:, s : s + 10], **{CACHE: ref}).logits)
    worst, kept, reused, remapped = 0.0, None, 0, 0
    layer = ours.layers[0]
    for t in range(30, 60):
        cap, raw_of = layer.cap, layer.raw_of.copy()
        meta = [layer._dev.get(k) for k in ("rsb", "seq")]
        a = model(input_ids=ids[:, t : t + 1], **{CACHE: ours}).logits.float()
        b = model(input_ids=ids[:, t : t + 1], **{CACHE: ref}).logits.float()
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
        _assert_step_state(layer)
        step = layer._dev.get("step")
        if layer.cap != cap:  # the records grew after the attention: the step metadata was dropped
            kept = None
            continue
        if meta[0] is not None and not np.array_equal(raw_of, layer.raw_of):
            assert all(layer._dev.get(k) is m for k, m in zip(("rsb", "seq"), meta, strict=True))
            assert np.array_equal(layer._dev["rsb"].cpu().numpy(), layer.raw_of.reshape(-1))
            remapped += 1
        assert step is not None
        if kept is not None:
            assert step[0] is kept[0]
            reused += 1
        kept = step
    assert remapped > 0
    return worst, reused, ours


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_decode_steps_read_records_like_the_decoded_copy(paged_calls) -> None:
    """On CUDA (float32 model): one-token steps run the fused paged kernel through the layers' step
    buffers, with flushes during decoding, and give the decoded-copy cache's logits up to the kernel's
    float16 products (p * |v| and the tensor-core query products round to 11 significant bits); the
    step buffers stay the same tensors from step to step, and most steps replay each layer's CUDA
    graph of the op and its append."""
    from turboquant_codec.backends import availability

    if not torch.cuda.is_available() or not availability("cupy_raw"):
        pytest.skip("needs torch CUDA and cupy_raw")
    model = _model("llama").cuda()
    ids = torch.randint(1, 128, (2, 60), generator=torch.Generator().manual_seed(2)).cuda()
    worst, reused, ours = _device_branch_steps(model, ids)
    assert reused > 0
    layers = model.config.num_hidden_layers
    assert paged_calls[0] == 30 * layers
    # Most steps replay the layer's CUDA graph (the first sight of a state runs eagerly, the
    # second captures; flushes every 8 tokens and new blocks take the general commit).
    print(f"graph replays: {paged_calls[1]} of {paged_calls[0]} layer steps")
    assert paged_calls[1] >= 10 * layers
    assert worst < 5e-3
    assert ours.memory().decoded == 0


@torch.no_grad()
def test_bfloat16_decode_steps_take_the_device_branch(paged_calls) -> None:
    """A bfloat16 model on the CPU takes the GPU's branch (torch tensors into ``tq.paged_attention``,
    step buffers, K and V appended in one scatter from them), so CI runs it: logits as the
    decoded-copy cache's within four bfloat16 steps (2**-6) of the largest, buffers reused."""
    model = _model("llama").to(torch.bfloat16)
    ids = torch.randint(1, 128, (2, 60), generator=torch.Generator().manual_seed(2))
    worst, reused, ours = _device_branch_steps(model, ids)
    assert ours.layers[0].on_host is False
    assert reused > 0
    assert paged_calls[0] == 30 * model.config.num_hidden_layers and paged_calls[2] == 0
    assert worst < 2.0**-6
    mem = ours.memory()
    assert mem.decoded == 0
    # Device bytes: each storage the layers hold (records, raw pool, step metadata and buffers)
    # counted once, views not again.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for lay in ours.layers
                for t in (lay.packed, lay.raw, *lay._dev.values(), *lay._dev["step"])
                if isinstance(t, torch.Tensor)}
    assert mem.device == sum(storages.values()) + mem.metadata
