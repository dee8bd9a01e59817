"""``PagedDecoder`` and the ``numba_cpu`` decode kernel against the NumPy reference, on fresh random
caches: every mse bit width, GQA groups, head dims, raw pools of each host dtype or none, tables
padded with -1, requests of different lengths (one with no context), padding rows and requests;
the decoder's checks (once per cache, the step's arrays every call) and its errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import turboquant_codec as tq
from turboquant_codec import CodecConfig, PagedCache, PagedDecoder, paged
from turboquant_codec.config import MSE_BITS

BLOCK = 16


def _build(lens: list[int], h: int, d: int, bits: float, raw: str | None, seed: int
           ) -> tuple[PagedCache, np.ndarray]:
    """A packed K+V cache holding ``lens`` tokens per request (written by paged_write), with room
    for more; table columns past each request's blocks are -1."""
    rng = np.random.default_rng(seed)
    k_cfg, v_cfg = CodecConfig(d, bits, "mse", seed + 1), CodecConfig(d, bits, "mse", seed + 2)
    per = -(-max(lens) // BLOCK) + 2
    num_blocks = len(lens) * per + 3
    packed = rng.integers(0, 256, (num_blocks, h, BLOCK, k_cfg.record_bytes + v_cfg.record_bytes), np.uint8)
    k_cache = packed[..., : k_cfg.record_bytes].transpose(0, 2, 1, 3)
    v_cache = packed[..., k_cfg.record_bytes :].transpose(0, 2, 1, 3)
    table = rng.permutation(num_blocks)[: len(lens) * per].reshape(len(lens), per).astype(np.int32)
    for r, n in enumerate(lens):
        table[r, -(-(n + 2) // BLOCK) :] = -1  # room for two more tokens, then padding
    kw = {}
    if raw is not None:
        used = table[table >= 0]
        chosen = rng.choice(used, max(1, used.size // 3), replace=False)
        raw_map = np.full(num_blocks, -1, np.int32)
        raw_map[chosen] = rng.permutation(chosen.size + 2)[: chosen.size]
        pool = rng.standard_normal((chosen.size + 2, BLOCK, h, d)).astype(raw)
        kw = dict(raw_k=pool, raw_v=rng.standard_normal(pool.shape).astype(raw), raw_slot_of_block=raw_map)
    cache = PagedCache(k_cache, v_cache, k_cfg, v_cfg, **kw)
    for r, n in enumerate(lens):
        if not n:
            continue
        pos = np.arange(n)
        x = rng.standard_normal((2, n, h, d)).astype(np.float32)
        cache = tq.paged_write(cache, x[0], x[1], table[r, pos // BLOCK] * BLOCK + pos % BLOCK)
    return cache, table


def _step(b: int, h: int, group: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h * group, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, h, d)).astype(np.float32) for _ in range(2))
    return q, k, v


def _reference(cache: PagedCache, q: np.ndarray, k: np.ndarray, v: np.ndarray, table: np.ndarray,
               seq: np.ndarray) -> np.ndarray:
    qsl = np.arange(seq.size + 1, dtype=np.int32)
    return tq.paged_attention(cache, q, k, v, table, seq, qsl, scale=0.125, backend="numpy")


def _available(name: str) -> None:
    if not tq.backends.availability(name):
        pytest.skip(tq.backends.availability(name).reason)


CASES = ([(bits, 3, 3, 64, "float32") for bits in MSE_BITS]
         + [(2.5, 1, 1, 64, None), (3.5, 2, 4, 128, "float16"), (4.0, 4, 2, 32, "float32"),
            (1.5, 2, 1, 48, "float16")])


@pytest.mark.parametrize("backend", ["numba_cpu", "numpy"])
@pytest.mark.parametrize(("bits", "h", "group", "d", "raw"), CASES)
def test_decoder_steps_match_reference(backend: str, bits: float, h: int, group: int, d: int,
                                       raw: str | None) -> None:
    """Two steps through one decoder: the second after the first step's tokens were written and
    ``seq_lens`` advanced in place, so new records are read."""
    _available(backend)
    lens = [37, 1, 70, 16] if d != 128 else [40, 0, 21]
    cache, table = _build(lens, h, d, bits, raw, seed=int(bits * 10) + d + h)
    seq = np.array(lens, np.int32) + 1
    decoder = PagedDecoder(cache, table, backend=backend)
    for s in range(2):
        q, k, v = _step(len(lens), h, group, d, seed=100 + s)
        ref = _reference(cache, q, k, v, table, seq)
        got = decoder(q, k, v, seq, scale=0.125)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
        assert np.abs(ref).max() > 0.05
        pos = seq - 1
        cache = tq.paged_write(cache, k, v, table[np.arange(len(lens)), pos // BLOCK] * BLOCK + pos % BLOCK)
        seq += 1


@pytest.mark.parametrize(("bits", "h", "group", "d", "raw"), CASES[::2])
def test_numba_cpu_mixed_batch_matches_reference(bits: float, h: int, group: int, d: int,
                                                 raw: str | None) -> None:
    """The public op on numba_cpu: decodes, a prefill request, a padding request (no new token) and
    padding rows, with a float16 output (the kernel's float32 result copied into it)."""
    _available("numba_cpu")
    lens = [30, 50, 9, 20]
    cache, table = _build(lens, h, d, bits, raw, seed=7 + d)
    q_lens = [1, 1, 0, 3]  # request 2 is padding: it has no row and its output is untouched
    rng = np.random.default_rng(8)
    t = sum(q_lens) + 2
    q = rng.standard_normal((t, h * group, d)).astype(np.float32)
    k, v = (rng.standard_normal((t, h, d)).astype(np.float32) for _ in range(2))
    seq = np.array([n + m for n, m in zip(lens, q_lens, strict=True)], np.int32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    ref = tq.paged_attention(cache, q, k, v, table, seq, qsl, scale=0.125, backend="numpy")
    got = tq.paged_attention(cache, q, k, v, table, seq, qsl, scale=0.125, backend="numba_cpu",
                             out=np.zeros(q.shape, np.float16), num_decodes=3)
    np.testing.assert_allclose(got, ref.astype(np.float16), rtol=2e-3, atol=2e-3)
    assert np.all(got[int(qsl[-1]) :] == 0) and np.abs(ref).max() > 0.05


def test_cache_checked_once_and_steps_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    cache, table = _build([40, 25], 2, 64, 3.5, "float32", seed=3)
    checks = []
    real = paged._check_cache
    monkeypatch.setattr(paged, "_check_cache", lambda c: (checks.append(c), real(c)))
    decoder = PagedDecoder(cache, table)
    seq = np.array([41, 26], np.int32)
    for s in range(3):
        q, k, v = _step(2, 2, 2, 64, seed=s)
        decoder(q, k, v, seq, scale=0.125)
    assert len(checks) == 1
    with pytest.raises(ValueError, match="seq_lens"):
        decoder(q, k, v, np.array([41, 10**4], np.int32), scale=0.125)  # past the blocks row 1 maps
    with pytest.raises(ValueError, match="seq_lens"):
        decoder(q, k, v, np.array([0, 26], np.int32), scale=0.125)
    with pytest.raises(ValueError, match="query must be"):
        decoder(q[:, :3], k, v, seq, scale=0.125)
    with pytest.raises(ValueError, match="query must be"):
        decoder(q[:1], k[:1], v[:1], seq, scale=0.125)
    with pytest.raises(ValueError, match="scale"):
        decoder(q, k, v, seq, scale=-1.0)
    with pytest.raises(ValueError, match="out must be"):
        decoder(q, k, v, seq, scale=0.125, out=np.zeros((2, 4, 32), np.float32))


def test_bad_cache_is_refused_when_built() -> None:
    cache, table = _build([20], 1, 64, 2.5, None, seed=4)
    with pytest.raises(ValueError, match="k_channels is None"):
        PagedDecoder(cache.with_channels(None, cache.v_channels), table)
    with pytest.raises(TypeError, match="block_table must be an integer array"):
        PagedDecoder(cache, table.astype(np.float32))
    with pytest.raises(TypeError, match="cache must be a PagedCache"):
        PagedDecoder("cache", table)  # type: ignore[arg-type]


def test_channels_changed_in_place_stay_inside_out() -> None:
    """Channel lists corrupted in place after the decoder checked them: the kernel clamps them (as
    the GPU kernels do), so it neither reads nor writes outside its rows; only ``out`` changes."""
    _available("numba_cpu")
    cache, table = _build([40, 25], 2, 64, 3.5, "float32", seed=5)
    decoder = PagedDecoder(cache, table, backend="numba_cpu")
    assert cache.k_channels is not None and cache.v_channels is not None
    # Just past the row: unclamped, the last request's last head would write into guard row 3.
    cache.k_channels[1, 0] = cache.v_channels[1, 3] = 64 + 5
    guard = np.full((4, 4, 64), 7.0, np.float32)  # out is rows 1-2: rows 0 and 3 must stay 7
    q, k, v = _step(2, 2, 2, 64, seed=6)
    decoder(q, k, v, np.array([41, 26], np.int32), scale=0.125, out=guard[1:3])
    assert np.all(guard[[0, 3]] == 7.0)
    assert np.all(np.isfinite(guard[1:3]))
