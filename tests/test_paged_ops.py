"""The paged ops of the public API on host arrays: the NumPy reference against the contiguous
``attention`` op, every host backend against the reference, batch invariance, and bad input.

The GPU backends' paged ops are tested in ``test_cupy_paged.py`` and ``test_numba_paged.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import CodecConfig, PagedCache
from turboquant_codec.capabilities import CAPABILITIES

H, GROUP, BLOCK, NUM_BLOCKS = 3, 3, 16, 48


@dataclass
class Paged:
    cache: PagedCache
    table: np.ndarray  # [B, max_blocks] int32
    k_ctx: list[np.ndarray]  # per request, [len, H, d] float32 originals
    v_ctx: list[np.ndarray]


def make(lens: list[int], d: int, bits: float, raw_blocks: int, seed: int, rotation: str = "haar") -> Paged:
    """A packed K+V cache (vLLM's layout) holding ``lens`` tokens per request, written by paged_write."""
    rng = np.random.default_rng(seed)
    k_cfg = CodecConfig(d, bits, "mse", seed + 1, rotation)
    v_cfg = CodecConfig(d, bits, "mse", seed + 2, rotation)
    packed = rng.integers(0, 256, (NUM_BLOCKS, H, BLOCK, k_cfg.record_bytes + v_cfg.record_bytes), np.uint8)
    k_cache = packed[..., : k_cfg.record_bytes].transpose(0, 2, 1, 3)
    v_cache = packed[..., k_cfg.record_bytes :].transpose(0, 2, 1, 3)
    per = -(-max(lens) // BLOCK) + 1
    table = rng.permutation(NUM_BLOCKS)[: len(lens) * per].reshape(len(lens), per).astype(np.int32)
    raw_map = np.full(NUM_BLOCKS, -1, np.int32)
    chosen = rng.choice(table.ravel(), raw_blocks, replace=False)
    raw_map[chosen] = rng.permutation(raw_blocks + 2)[:raw_blocks]
    raw_k = rng.standard_normal((raw_blocks + 2, BLOCK, H, d)).astype(np.float16)
    cache = PagedCache(k_cache, v_cache, k_cfg, v_cfg, raw_k=raw_k, raw_v=raw_k.copy(),
                       raw_slot_of_block=raw_map)
    k_ctx = [rng.standard_normal((n, H, d)).astype(np.float32) for n in lens]
    v_ctx = [rng.standard_normal((n, H, d)).astype(np.float32) for n in lens]
    for r, n in enumerate(lens):
        pos = np.arange(n)
        cache = tq.paged_write(cache, k_ctx[r], v_ctx[r], table[r, pos // BLOCK] * BLOCK + pos % BLOCK)
    return Paged(cache, table, k_ctx, v_ctx)


def step(p: Paged, q_lens: list[int], seed: int) -> tuple[np.ndarray, ...]:
    """A step's query, new K/V (two padding rows past the last request) and metadata."""
    rng = np.random.default_rng(seed)
    d, t = p.cache.head_dim, sum(q_lens) + 2
    query = rng.standard_normal((t, H * GROUP, d)).astype(np.float32)
    key, value = (rng.standard_normal((t, H, d)).astype(np.float32) for _ in range(2))
    seq = np.array([len(k) + n for k, n in zip(p.k_ctx, q_lens, strict=True)], np.int32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return query, key, value, seq, qsl


@pytest.mark.parametrize("bits", [2.5, 3.5, 4.0])
def test_reference_matches_attention_op_on_gathered_records(bits: float) -> None:
    """Decode requests against ``tq.attention`` over each request's records gathered in order."""
    p = make([37, 70, 16], 64, bits, raw_blocks=0, seed=3)
    query, key, value, seq, qsl = step(p, [1, 1, 1], seed=4)
    out = tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl, scale=0.125, backend="numpy")
    for r, n in enumerate(len(k) for k in p.k_ctx):
        pos = np.arange(n)
        blocks, offsets = p.table[r, pos // BLOCK], pos % BLOCK
        k_enc, v_enc = (tq.Encoded(np.ascontiguousarray(c[blocks, offsets].transpose(1, 0, 2)), ch, cfg)
                        for c, ch, cfg in ((p.cache.k_cache, p.cache.k_channels, p.cache.k_config),
                                           (p.cache.v_cache, p.cache.v_channels, p.cache.v_config)))
        expected = tq.attention(query[r], k_enc, v_enc, scale=0.125, k_tail=key[r][:, None],
                                v_tail=value[r][:, None], backend="numpy")
        np.testing.assert_allclose(out[r], expected, rtol=1e-5, atol=1e-6)
    assert np.all(out[3:] == 0)  # padding rows untouched


def _host_backends() -> list[str]:
    rows = CAPABILITIES["paged_attention"]
    return [n for n in rows if n != "numpy" and tq.backends.REGISTRY[n][1] == "cpu"]


@pytest.mark.parametrize("name", _host_backends())
@pytest.mark.parametrize("raw_dtype", ["float16", "float32"])
@pytest.mark.parametrize(("bits", "rotation"), [(2.5, "haar"), (3.5, "haar"), (4.0, "haar"),
                                                (3.5, "hadamard2"), (4.0, "hadamard")])
def test_host_backend_matches_reference(name: str, bits: float, raw_dtype: str, rotation: str) -> None:
    if not tq.backends.availability(name):
        pytest.skip(tq.backends.availability(name).reason)
    p = make([45, 100, 20, 64], 64, bits, raw_blocks=5, seed=7, rotation=rotation)
    p = Paged(tq.PagedCache(**{**vars(p.cache), "raw_k": p.cache.raw_k.astype(raw_dtype),
                               "raw_v": p.cache.raw_v.astype(raw_dtype)}), p.table, p.k_ctx, p.v_ctx)
    query, key, value, seq, qsl = step(p, [1, 1, 5, 1], seed=8)
    ref = tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl, scale=0.125, backend="numpy")
    got = tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl, scale=0.125, backend=name)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    assert np.all(got[int(qsl[-1]) :] == 0) and np.abs(ref).max() > 0.05  # padding rows untouched


def test_output_does_not_depend_on_the_batch() -> None:
    """A request's row is bitwise the same alone and beside others (auto backend on the host)."""
    p = make([45, 100, 20], 64, 3.5, raw_blocks=4, seed=11)
    query, key, value, seq, qsl = step(p, [1, 1, 1], seed=12)
    together = tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl, scale=0.125)
    for r in range(3):
        one = slice(r, r + 1)
        alone = tq.paged_attention(p.cache, query[one], key[one], value[one], p.table[one], seq[one],
                                   np.array([0, 1], np.int32), scale=0.125)
        assert np.array_equal(alone[0], together[r])


def test_write_is_all_or_nothing_and_skips_padding() -> None:
    p = make([20], 64, 3.5, raw_blocks=1, seed=5)
    before = (p.cache.k_cache.copy(), p.cache.v_cache.copy(), p.cache.raw_k.copy())
    key = np.ones((3, H, 64), np.float32)
    with pytest.raises(ValueError, match=f"slot_mapping holds slot {NUM_BLOCKS * BLOCK} but the cache has"):
        tq.paged_write(p.cache, key, key, np.array([5, -1, NUM_BLOCKS * BLOCK]))
    assert all(np.array_equal(a, b) for a, b in zip(before, (p.cache.k_cache, p.cache.v_cache, p.cache.raw_k),
                                                      strict=True))
    tq.paged_write(p.cache, key, key, np.array([-1, 21]))  # padding row 0, row 2 past the mapping
    changed = np.argwhere(np.any(p.cache.k_cache != before[0], axis=(2, 3)))
    assert changed.tolist() == [[1, 5]]


@pytest.mark.parametrize(("override", "message"), [
    ({"table": "negative"}, r"block_table\[0, 1\] = -1 lies outside the cache's 48 blocks"),
    ({"table": "large"}, r"block_table\[0, 1\] = 48 lies outside"),
    ({"qsl": [0, 2, 1, 3]}, "query_start_loc must rise from 0"),
    ({"num_decodes": 3}, r"num_decodes=3 but query lengths are \[1, 1, 2\]"),
    ({"num_decodes": 4}, r"num_decodes must be an integer in 0..3"),
    ({"scale": float("inf")}, "scale must be a positive finite number"),
])
def test_bad_metadata_is_named(override: dict, message: str) -> None:
    p = make([30, 20, 10], 64, 3.5, raw_blocks=0, seed=9)
    query, key, value, seq, qsl = step(p, [1, 1, 1], seed=10)
    table = p.table.copy()
    if override.get("table") == "negative":
        table[0, 1] = -1
    elif override.get("table") == "large":
        table[0, 1] = NUM_BLOCKS
    if "qsl" in override:
        qsl = np.array(override["qsl"], np.int32)
    if override.get("num_decodes") == 3:
        qsl, seq = np.array([0, 1, 2, 4], np.int32), seq + np.array([0, 0, 1], np.int32)
    with pytest.raises(ValueError, match=message):
        tq.paged_attention(p.cache, query, key, value, table, seq, qsl, scale=override.get("scale", 0.125),
                           num_decodes=override.get("num_decodes"))


@pytest.mark.gpu
def test_repeated_gpu_calls_read_new_values_and_check_new_shapes() -> None:
    """The public API keeps a GPU cache's checks and views per cache signature: the same buffers with
    new values give the new results, and a step's new shape is still checked."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

    def gpu(a: np.ndarray) -> object:
        return torch.from_numpy(np.ascontiguousarray(a)).cuda()

    p = make([45, 100, 20], 64, 3.5, raw_blocks=4, seed=21)
    c = p.cache
    cache = PagedCache(gpu(c.k_cache), gpu(c.v_cache), c.k_config, c.v_config, gpu(c.k_channels),
                       gpu(c.v_channels), gpu(c.raw_k), gpu(c.raw_v), gpu(c.raw_slot_of_block))
    table, out = gpu(p.table), torch.zeros(5, H * GROUP, 64, device="cuda")
    buffers = None
    for seed in (22, 23):
        query, key, value, seq, qsl = step(p, [1, 1, 1], seed=seed)
        ref = tq.paged_attention(c, query, key, value, p.table, seq, qsl, scale=0.125, backend="numpy")
        if buffers is None:
            buffers = [gpu(a) for a in (query, key, value, seq, qsl)]
        else:
            for buf, a in zip(buffers, (query, key, value, seq, qsl), strict=True):
                buf.copy_(torch.from_numpy(a))
        q, k, v, s, sl = buffers
        tq.paged_attention(cache, q, k, v, table, s, sl, scale=0.125, out=out, num_decodes=3)
        np.testing.assert_allclose(out.cpu().numpy()[:3], ref[:3], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="query must be"):
        tq.paged_attention(cache, q[:, :5], k, v, table, s, sl, scale=0.125, num_decodes=3)


def test_kept_cache_views_serve_new_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-cache keeping (GPU caches) driven on the host by keying NumPy arrays as the GPU path
    keys tensors: the cache is checked once, every step's own arrays on every call, and each step's
    result equals a fresh reference call."""
    from turboquant_codec import _interop, _replay, paged

    def host_key(x: object) -> tuple | None:
        if x is None:
            return ()
        return (x.__array_interface__["data"][0], x.shape, x.strides, x.dtype)  # type: ignore[attr-defined]

    checks = []
    monkeypatch.setattr(_interop, "gpu_key", host_key)
    monkeypatch.setattr(paged, "_PREPARED", _replay.Memo())
    real_check = paged._check_cache
    monkeypatch.setattr(paged, "_check_cache", lambda c: (checks.append(c), real_check(c)))
    p = make([45, 100, 20], 64, 3.5, raw_blocks=4, seed=31)
    checks.clear()  # the writes' own checks
    for seed in (32, 33, 34):
        query, key, value, seq, qsl = step(p, [1, 1, 1], seed=seed)
        got = tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl, scale=0.125, num_decodes=3)
        ref = tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl, scale=0.125, backend="numpy")
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    assert len(checks) == 2  # once for the auto backend, once for the reference's own entry
    with pytest.raises(ValueError, match="query_start_loc must rise from 0"):
        tq.paged_attention(p.cache, query, key, value, p.table, seq, qsl[::-1].copy(), scale=0.125)


@pytest.mark.parametrize("name", ["numpy", "numba_cpu"])
def test_raw_slot_past_the_pool_is_no_raw_row(name: str) -> None:
    """PagedCache's rule, in the backends (the public ops refuse such host entries, so the backend
    modules are called directly): a raw_slot_of_block entry past the raw pool reads the block from
    its records, exactly as -1 does; paged_write writes the records and no raw copy."""
    if not tq.backends.availability(name):
        pytest.skip(tq.backends.availability(name).reason)
    from turboquant_codec.backends import numpy_ref

    module = numpy_ref if name == "numpy" else tq.backends.load(name)
    p = make([45, 100, 20], 64, 3.5, raw_blocks=5, seed=13)
    num_raw = p.cache.raw_k.shape[0]
    mapped = np.flatnonzero(p.cache.raw_slot_of_block >= 0)
    past, none = (p.cache.raw_slot_of_block.copy() for _ in range(2))
    past[mapped[:3]] = num_raw + np.arange(3)  # one entry just past the pool, two further
    none[mapped[:3]] = -1
    caches = {k: PagedCache(**{**vars(p.cache), "raw_slot_of_block": m}) for k, m in (("past", past),
                                                                                      ("none", none))}
    query, key, value, seq, qsl = step(p, [1, 1, 5], seed=14)

    def attend(cache: PagedCache) -> np.ndarray:
        out = np.zeros(query.shape, np.float32)
        module.paged_attention(cache, query, key, value, p.table, seq, qsl, 0.125, out, 2)
        return out

    got = attend(caches["past"])
    assert np.array_equal(got, attend(caches["none"]))
    assert not np.allclose(got, attend(p.cache), rtol=1e-3, atol=1e-3)  # the raw rows did count there
    pool, records = p.cache.raw_k.copy(), p.cache.k_cache.copy()
    block = int(mapped[0])
    numpy_ref.paged_write(caches["past"], key[:2], value[:2], np.array([block * BLOCK, block * BLOCK + 1]))
    assert np.array_equal(p.cache.raw_k, pool)
    assert not np.array_equal(p.cache.k_cache[block, :2], records[block, :2])
