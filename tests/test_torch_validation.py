"""The torch wrapper, its paged ops and the HF caches under the codec's input rules: nothing
wrapped or truncated, fakes (meta tensors) that refuse what the real ops refuse, a shared
``TorchCodec`` that is safe under threads, a refused write that writes and fixes nothing, and cache
bookkeeping that survives ``sinks=0`` and a model with fewer layers than the cache.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import turboquant_torch as tt  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from turboquant_torch import hf_attention  # noqa: E402
from turboquant_torch import paged as tpaged  # noqa: E402
from turboquant_torch.baselines import DecodedCopyCache  # noqa: E402
from turboquant_torch.hf_cache import CACHE_ARG, TurboQuantCache  # noqa: E402


def _x(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize(("seed", "error"), [(2**64, ValueError), (-1, ValueError), (1.9, TypeError),
                                             (True, TypeError)], ids=repr)
def test_seed_is_never_wrapped_or_truncated(seed: object, error: type) -> None:
    x = _x((2, 5, 64), 0)
    for call in (lambda: tt.encode(x, seed=seed), lambda: tt.TorchCodec(64, seed=seed),
                 lambda: tt.decode(torch.zeros(2, 5, 28, dtype=torch.uint8), None, d=64, bits=3, seed=seed),
                 lambda: TurboQuantCache(LlamaConfig(**SHAPE), seed=seed)):
        with pytest.raises(error, match="seed must be an integer"):
            call()


def test_numpy_seeds_and_the_top_seed_round_trip() -> None:
    x = _x((2, 5, 64), 1)
    assert torch.equal(tt.encode(x, bits=3, seed=np.int64(9))[0], tt.encode(x, bits=3, seed=9)[0])
    top = 2**64 - 1
    records, _ = tt.encode(x, bits=3, seed=top)
    np.testing.assert_array_equal(records.numpy(), __import__("turboquant_codec").encode(x.numpy(), bits=3,
                                                                                         seed=top).records)
    assert tt.TorchCodec(64, seed=np.uint64(top)).config.seed == top


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"d": 64.9}, TypeError, "d must be an integer"),
    ({"d": "64"}, TypeError, "d must be an integer"),
    ({"bits": True}, TypeError, "bits must be a real number"),
    ({"bits": "3.5"}, TypeError, "bits must be a real number"),
])
def test_torch_codec_arguments(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        tt.TorchCodec(**{"d": 64, **kwargs})


def test_wrapper_scalars() -> None:
    x = _x((2, 5, 64), 2)
    rec, ch = tt.encode(x, bits=3)
    codec = tt.TorchCodec(64, 3.0)
    with pytest.raises(TypeError, match="d must be an integer"):
        tt.decode(rec, ch, d=64.9, bits=3)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        tt.attention(x[:, 0], rec, None, rec, None, k_codec=codec, v_codec=codec, scale=float("inf"))
    with pytest.raises(TypeError, match="bits must be a real number"):
        tt.scores(x, rec, None, bits="3")


# ------------------------------------------------------------------------------------------- fakes
def _fake(fn):  # type: ignore[no-untyped-def]
    with FakeTensorMode():
        return fn()


@pytest.mark.parametrize(("name", "make", "message"), [
    ("encode-channels", lambda: torch.ops.turboquant.encode(
        torch.empty(2, 10, 64), torch.empty(3, 64, dtype=torch.uint16), 3.5, "mse", 0, True),
     r"channels must have shape \(2, 64\)"),
    ("encode-empty", lambda: torch.ops.turboquant.encode(torch.empty(2, 0, 64), None, 3.0, "mse", 0, True),
     "x is empty"),
    ("decode-channels", lambda: torch.ops.turboquant.decode(
        torch.empty(2, 10, 32, dtype=torch.uint8), torch.empty(5, 64, dtype=torch.uint16), 64, 3.5, "mse", 0),
     r"channels must have shape \(2, 64\)"),
    ("scores-lead", lambda: torch.ops.turboquant.scores(
        torch.empty(3, 4, 64), torch.empty(2, 10, 28, dtype=torch.uint8), None, 3.0, "mse", 0),
     "leading dimensions differ"),
    ("attention-gqa", lambda: torch.ops.turboquant.attention(
        torch.empty(3, 64), torch.empty(2, 10, 28, dtype=torch.uint8), None,
        torch.empty(2, 10, 28, dtype=torch.uint8), None, 3.0, "mse", 0, 3.0, "mse", 0, 0.1, None, None),
     r"query heads \(3\) must be a multiple of KV heads \(2\)"),
    ("attention-scale", lambda: torch.ops.turboquant.attention(
        torch.empty(4, 64), torch.empty(2, 10, 28, dtype=torch.uint8), None,
        torch.empty(2, 10, 28, dtype=torch.uint8), None, 3.0, "mse", 0, 3.0, "mse", 0, float("nan"), None,
        None),
     "scale must be a positive finite"),
    ("attention-tail", lambda: torch.ops.turboquant.attention(
        torch.empty(4, 64), torch.empty(2, 10, 28, dtype=torch.uint8), None,
        torch.empty(2, 10, 28, dtype=torch.uint8), None, 3.0, "mse", 0, 3.0, "mse", 0, 0.1,
        torch.empty(2, 3, 64), None), "k_tail and v_tail must be given together"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_fakes_refuse_what_the_ops_refuse(name: str, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        _fake(make)  # the fake implementation (meta shapes only)
    with pytest.raises(ValueError, match=message):
        make()  # the real op on CPU tensors of the same shapes


# ------------------------------------------------------------------------------------------ threads
def test_shared_codec_first_choice_happens_once() -> None:
    """Threads that make the first encode of one shared codec together: every stream decodes with
    the one permutation the codec kept (without the lock several choices raced, and the losers'
    records decoded as garbage)."""
    n_threads, trials = 8, 6
    for trial in range(trials):
        codec = tt.TorchCodec(64, 3.5, seed=1)
        # Each thread's data has its own outlier channels, so distinct choices would differ.
        xs = [_x((2, 32, 64), 100 * trial + i) * torch.from_numpy(
            np.random.default_rng(i + 7 * trial).permutation(np.linspace(0.1, 4, 64)).astype(np.float32))
            for i in range(n_threads)]
        records: list[torch.Tensor | None] = [None] * n_threads
        barrier = threading.Barrier(n_threads)

        def work(i: int, codec: tt.TorchCodec = codec, xs: list = xs, records: list = records,
                 barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            records[i] = codec.encode(xs[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codec.channels is not None
        for i in range(n_threads):
            expected, _ = tt.encode(xs[i], bits=3.5, seed=1, channels=codec.channels)
            assert torch.equal(records[i], expected), f"trial {trial}: thread {i} used another channel split"


def test_codec_copies_get_their_own_lock() -> None:
    import copy
    import pickle

    codec = tt.TorchCodec(64, 3.5, seed=3)
    codec.encode(_x((2, 8, 64), 5))
    clone = copy.deepcopy(codec)  # (torch cannot pickle uint16 tensors: the channels)
    assert clone._first is not codec._first and torch.equal(clone.channels, codec.channels)
    assert torch.equal(clone.encode(_x((2, 4, 64), 6)), codec.encode(_x((2, 4, 64), 6)))
    plain = pickle.loads(pickle.dumps(tt.TorchCodec(64, 3.0, seed=3)))
    assert torch.equal(plain.encode(_x((2, 4, 64), 6)), tt.encode(_x((2, 4, 64), 6), bits=3, seed=3)[0])


# ------------------------------------------------------------------------------------ paged writes
H, BS, NB = 2, 16, 4


def test_refused_write_writes_nothing_and_fixes_nothing() -> None:
    k_codec, v_codec = tt.TorchCodec(64, 3.5, seed=1), tt.TorchCodec(64, 2.5, seed=2)
    packed = torch.zeros(NB, H, BS, tpaged.kv_state_bytes(k_codec, v_codec), dtype=torch.uint8)
    k_cache, v_cache = tpaged.split_kv_cache(packed, k_codec, v_codec)
    raw = (torch.zeros(2, BS, H, 64), torch.zeros(2, BS, H, 64),
           torch.tensor([0, -1, 1, -1], dtype=torch.int32))
    key, value = _x((3, H, 64), 3), _x((3, H, 64), 4)
    for slots, message in ((torch.tensor([1, 2, NB * BS]), "slot_mapping holds slot 64"),
                           (torch.tensor([1, 2, 3, 4]), "4 entries but only 3 new tokens")):
        with pytest.raises(ValueError, match=message):
            tpaged.write_compressed(k_cache, v_cache, key, value, slots, k_codec, v_codec, raw=raw)
        assert not packed.any() and not raw[0].any() and not raw[1].any()
        assert k_codec.channels is None and v_codec.channels is None
    with pytest.raises(ValueError, match="value has"):
        tpaged.write_compressed(k_cache, v_cache, key, value[:2], torch.tensor([1, 2, 3]), k_codec, v_codec)
    assert k_codec.channels is None and v_codec.channels is None
    # A good batch then fixes both from its own tokens and writes them.
    slots = torch.tensor([1, -1, 40])
    tpaged.write_compressed(k_cache, v_cache, key, value, slots, k_codec, v_codec, raw=raw)
    rows = torch.tensor([0, 2])
    assert torch.equal(k_codec.channels, tt.encode(key[rows].transpose(0, 1), bits=3.5, seed=1)[1])
    assert torch.equal(v_codec.channels, tt.encode(value[rows].transpose(0, 1), bits=2.5, seed=2)[1])
    assert packed[0, :, 1].any() and packed[2, :, 8].any() and not packed[0, :, 2:].any()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"block_size": 0}, ValueError, "block_size must be an integer >= 1"),
    ({"block_size": 16.0}, TypeError, "block_size must be an integer"),
    ({"window": -1}, ValueError, "window must be an integer >= 0"),
    ({"sink_tokens": True}, TypeError, "sink_tokens must be an integer"),
])
def test_raw_blocks_needed_arguments(kwargs: dict, error: type, message: str) -> None:
    args = {"block_size": 16, "window": 32, "sink_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        tpaged.raw_blocks_needed(torch.zeros(1, 2, dtype=torch.int32), torch.tensor([5]), **args)


def test_paged_attention_scalars() -> None:
    codec = tt.TorchCodec(64, 3.0)
    cache = torch.zeros(NB, BS, H, codec.record_bytes, dtype=torch.uint8)
    q, k = _x((1, 2 * H, 64), 8), _x((1, H, 64), 9)
    meta = (torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="num_decodes must be an integer"):
        tpaged.paged_attention(q, k, k, cache, cache, *meta, 0.125, codec, codec, num_decodes=1.0)
    with pytest.raises(ValueError, match="scale must be a positive finite"):
        tpaged.paged_attention(q, k, k, cache, cache, *meta, float("inf"), codec, codec)
    with pytest.raises(ValueError, match="out must be a float array"):
        tpaged.paged_attention(q, k, k, cache, cache, *meta, 0.125, codec, codec,
                               out=torch.zeros(1, 2 * H, 64, dtype=torch.int32))


def _paged_op_args(h_q: int = 2 * H, slots: int = 2) -> tuple[tuple, tuple]:
    """(paged_write args, paged_attention args) of the raw ops on CPU tensors (integer bits)."""
    codec = tt.TorchCodec(64, 3.0)
    cache = torch.zeros(NB, BS, H, codec.record_bytes, dtype=torch.uint8)
    k, q = _x((2, H, 64), 10), _x((2, h_q, 64), 11)
    cfg = (3.0, "mse", 0, 3.0, "mse", 0, "auto")
    write = (cache, cache.clone(), k, k, torch.arange(slots), None, None, None, None, None, *cfg)
    meta = (torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
            torch.tensor([0, 1, 2], dtype=torch.int32))
    attend = (torch.zeros(2, h_q, 64), q, k, k, cache, cache, None, None, None, None, None, *meta, 0.125, 2,
              *cfg)
    return write, attend


def test_paged_fakes_refuse_what_the_ops_refuse() -> None:
    write, attend = _paged_op_args()
    torch.library.opcheck(torch.ops.turboquant.paged_write.default, write)
    torch.library.opcheck(torch.ops.turboquant.paged_attention.default, attend)
    bad_write, bad_attend = _paged_op_args(h_q=3, slots=3)
    ops = torch.ops.turboquant
    for op, args, message in ((ops.paged_write, bad_write, "3 entries but only 2 new tokens"),
                              (ops.paged_attention, bad_attend, "query must be")):
        mode = FakeTensorMode()
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode, pytest.raises(ValueError, match=message):
            op(*fakes)  # the fake implementation
        with pytest.raises(ValueError, match=message):
            op(*args)


# --------------------------------------------------------------------------------------- HF caches
SHAPE = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, pad_token_id=0)


def _model(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return hf_attention.use(LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": layers})).eval())


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"flush_interval": 2.7}, TypeError, "flush_interval must be an integer"),
    ({"flush_interval": 0}, ValueError, "flush_interval must be an integer >= 1"),
    ({"sinks": True}, TypeError, "sinks must be an integer"),
    ({"sinks": -1}, ValueError, "sinks must be an integer >= 0"),
    ({"block_size": "16"}, TypeError, "block_size must be an integer"),
    ({"key_bits": True}, TypeError, "bits must be a real number"),
])
@pytest.mark.parametrize("cls", [TurboQuantCache, DecodedCopyCache], ids=lambda c: c.__name__)
def test_cache_arguments(cls: type, kwargs: dict, error: type, message: str) -> None:
    if cls is DecodedCopyCache and "block_size" in kwargs:
        pytest.skip("DecodedCopyCache has no blocks")
    with pytest.raises(error, match=message):
        cls(LlamaConfig(**SHAPE), **kwargs)


@pytest.mark.parametrize("cls", [TurboQuantCache, DecodedCopyCache], ids=lambda c: c.__name__)
def test_cache_states_dtype(cls: type) -> None:
    x = torch.zeros(1, 2, 3, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="key_states has dtype float64; supported: float16, bfloat16"):
        cls(LlamaConfig(**SHAPE)).update(x, x, 0)


def test_direct_updates_keep_their_own_errors() -> None:
    """A held step (its attention never ran) and a dtype change are refused as such, before the
    check that every layer saw the earlier steps."""
    cache = TurboQuantCache(LlamaConfig(**SHAPE))
    x = torch.zeros(1, 2, 4, 64)
    cache.update(x, x, 0)
    with pytest.raises(ValueError, match=r"torch.float16 but the cache holds torch.float32"):
        cache.update(x.half(), x.half(), 0)
    with pytest.raises(RuntimeError, match="turboquant"):
        cache.update(x, x, 0)
    cache.layers[0].pending = None  # as if its attention had run: layer 1 never saw that step
    with pytest.raises(ValueError, match=r"the cache's layers \[1\] missed earlier steps"):
        cache.update(x, x, 0)


def test_fewer_model_layers_than_the_cache_is_refused() -> None:
    model, cache = _model(1), TurboQuantCache(LlamaConfig(**SHAPE))
    message = "the model has 1 layers but the cache was built for 2"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(input_ids=torch.randint(1, 128, (1, 8)), **{CACHE_ARG: cache}, use_cache=True)
    assert cache.get_seq_length() == 0  # the refused step left nothing behind


@pytest.mark.parametrize("cls", [TurboQuantCache, DecodedCopyCache], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("method", "arg", "rows"), [("batch_select_indices", torch.tensor([1]), 1),
                                                     ("batch_repeat_interleave", 2, 4)])
def test_sinks_0_batch_edits_update_the_batch_size(cls: type, method: str, arg: object, rows: int) -> None:
    """With no sinks there is no sink tensor to read the batch from: the size must still follow."""
    model = _model(2)
    cache = cls(model.config, sinks=0, flush_interval=4)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids, **{CACHE_ARG: cache}, use_cache=True)
        getattr(cache, method)(arg)
        assert [layer.batch_size for layer in cache.layers] == [rows, rows]
        out = model(input_ids=torch.randint(1, 128, (rows, 1)), **{CACHE_ARG: cache}, use_cache=True)
    assert out.logits.shape[0] == rows and torch.isfinite(out.logits).all()
