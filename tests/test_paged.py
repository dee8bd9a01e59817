"""``turboquant_torch.paged`` against SDPA on contiguous K/V, through random block tables.

Each batch is a list of requests ``(context tokens already cached, new tokens)``; physical blocks are
a random permutation, so nothing relies on requests owning contiguous or ordered blocks. Context is
written in an earlier call than the new tokens (as chunked prefill and decode do), both with padding
slots (-1) whose rows hold NaN, and the caches start as 0xFF bytes (float16 NaN norms) and the raw
pool as NaN, so a read of anything never written shows up as NaN in the output.

The reference is ``scaled_dot_product_attention`` on the same K/V laid out contiguously: context
tokens decoded from their records (or raw where their block has a raw copy), new tokens raw. The
only difference left is float rounding; with raw copies of every block, none from the codec either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import turboquant_torch as tt
from torch.nn.functional import scaled_dot_product_attention as sdpa

import turboquant_codec as tq

from .conftest import kv_like

# name -> requests as (cached context tokens, new tokens)
SCENARIOS = {
    "single_decode": [(37, 1)],
    "many_decodes": [(5, 1), (40, 1), (0, 1), (70, 1), (16, 1)],
    "mixed_prefill_decode": [(0, 23), (50, 1), (33, 1), (0, 5)],
    "chunked_prefill": [(48, 20), (10, 1)],
}
KV_HEADS = 2
WINDOW, SINKS = 16, 4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclass
class Batch:
    """One layer's paged cache and a step's inputs, plus the original K/V of each request."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    k_codec: tt.TorchCodec
    v_codec: tt.TorchCodec
    full_k: list[torch.Tensor]  # per request [seq_len, H, d], original values
    full_v: list[torch.Tensor]
    raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    scale: float


def _slots(block_table: torch.Tensor, r: int, positions: range, block_size: int) -> list[int]:
    return [int(block_table[r, p // block_size]) * block_size + p % block_size for p in positions]


def _padded(rows: list[torch.Tensor], slots: list[int], gen: torch.Generator,
            extra_rows: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rows with NaN padding rows (slot -1) shuffled in, and ``extra_rows`` NaN rows past the slots."""
    nan = torch.full_like(rows[0], float("nan"))
    items = list(zip(rows, slots, strict=True)) + [(nan, -1)] * 3
    order = torch.randperm(len(items), generator=gen).tolist()
    items = [items[i] for i in order]
    return [x for x, _ in items] + [nan] * extra_rows, torch.tensor([s for _, s in items], dtype=torch.int64)


def make_batch(
    requests: list[tuple[int, int]], group: int, d: int, block_size: int, raw_mode: str,
    dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    seq_lens = [c + n for c, n in requests]
    n_blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(n_blocks) + 3  # spare blocks nobody owns
    physical = torch.randperm(num_blocks, generator=gen)
    block_table = torch.full((len(requests), max(n_blocks) + 1), -1, dtype=torch.int32)
    used = 0
    for r, nb in enumerate(n_blocks):
        block_table[r, :nb] = physical[used : used + nb].to(torch.int32)
        used += nb
    full_k = [torch.from_numpy(kv_like(rng, (s, KV_HEADS, d))).to(dtype) for s in seq_lens]
    full_v = [torch.from_numpy(kv_like(rng, (s, KV_HEADS, d))).to(dtype) for s in seq_lens]

    k_codec = tt.TorchCodec(d, 3.5, "mse", tq.stream_seed(11, 0))
    v_codec = tt.TorchCodec(d, 3.0, "mse", tq.stream_seed(11, 1))  # other bits: R_v != R_k
    k_cache = torch.full((num_blocks, block_size, KV_HEADS, k_codec.record_bytes), 255, dtype=torch.uint8)
    v_cache = torch.full((num_blocks, block_size, KV_HEADS, v_codec.record_bytes), 255, dtype=torch.uint8)
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)

    raw = None
    if raw_mode != "none":
        if raw_mode == "all":
            needed = torch.unique(block_table[block_table >= 0].long())
        else:
            needed = tt.raw_blocks_needed(block_table, torch.tensor(seq_lens), block_size, WINDOW, SINKS)
        num_raw = needed.numel() + 2
        raw_slot = torch.full((num_blocks,), -1, dtype=torch.int32)
        raw_slot[needed] = torch.randperm(num_raw, generator=gen)[: needed.numel()].to(torch.int32)
        shape = (num_raw, block_size, KV_HEADS, d)
        raw = (torch.full(shape, float("nan"), dtype=dtype, device=device),
               torch.full(shape, float("nan"), dtype=dtype, device=device), raw_slot.to(device))

    def write(parts: list[tuple[int, range]], extra_rows: int = 0) -> None:
        slots = [s for r, span in parts for s in _slots(block_table, r, span, block_size)]
        if not slots:
            return
        ks, slot_mapping = _padded([full_k[r][p] for r, span in parts for p in span], slots,
                                   torch.Generator().manual_seed(seed + 1), extra_rows)
        vs, _ = _padded([full_v[r][p] for r, span in parts for p in span], slots,
                        torch.Generator().manual_seed(seed + 1), extra_rows)
        key, value = torch.stack(ks).to(device), torch.stack(vs).to(device)
        slot_mapping = slot_mapping.to(device)
        tt.write_compressed(k_cache, v_cache, key, value, slot_mapping, k_codec, v_codec, raw=raw)

    # Earlier chunks / earlier steps, then this step's tokens (with CUDA-graph-style tail rows).
    write([(r, range(c)) for r, (c, _) in enumerate(requests)])
    write([(r, range(c, c + n)) for r, (c, n) in enumerate(requests)], extra_rows=2)

    key = torch.cat([full_k[r][c:] for r, (c, _) in enumerate(requests)])
    value = torch.cat([full_v[r][c:] for r, (c, _) in enumerate(requests)])
    q_lens = [n for _, n in requests]
    query = torch.from_numpy(kv_like(rng, (sum(q_lens), KV_HEADS * group, d))).to(dtype)
    # Two padding rows past query_start_loc[-1], as a padded CUDA-graph batch has.
    pad = torch.zeros(2, KV_HEADS, d, dtype=dtype)
    return Batch(
        query=torch.cat([query, torch.zeros(2, KV_HEADS * group, d, dtype=dtype)]).to(device),
        key=torch.cat([key, pad]).to(device),
        value=torch.cat([value, pad]).to(device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, *np.cumsum(q_lens)], dtype=torch.int32, device=device),
        k_codec=k_codec,
        v_codec=v_codec,
        full_k=full_k,
        full_v=full_v,
        raw=raw,
        scale=d**-0.5,
    )


def _is_raw(b: Batch, r: int, length: int) -> torch.Tensor:
    if b.raw is None:
        return torch.zeros(length, dtype=torch.bool)
    block_size = b.k_cache.shape[1]
    blocks = b.block_table[r, torch.arange(length, device=b.block_table.device) // block_size].long()
    return (b.raw[2][blocks] >= 0).cpu()


def _stored(cache: torch.Tensor, b: Batch, r: int, length: int) -> torch.Tensor:
    """Records [H, length, R] of request r's first ``length`` tokens, read back from the cache."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    return cache[b.block_table[r, pos // block_size].long(), pos % block_size].transpose(0, 1).cpu()


def reference(b: Batch, from_cache: bool = False) -> torch.Tensor:
    """SDPA per request on contiguous K/V: context decoded (or raw), new tokens raw; [T, Hq, d] float32.

    ``from_cache``: decode the records found in the cache (on CPU) instead of re-encoding the
    originals, so records a GPU encoder rounded differently do not count as attention errors.
    """
    starts, seq = b.query_start_loc.tolist(), b.seq_lens.tolist()
    out = torch.zeros(b.query.shape, dtype=torch.float32)
    for r in range(len(seq)):
        n = starts[r + 1] - starts[r]
        c = seq[r] - n
        ks, vs = [], []
        for full, codec, cache in ((b.full_k[r], b.k_codec, b.k_cache), (b.full_v[r], b.v_codec, b.v_cache)):
            x = full.float()
            if c:
                channels = None if codec.channels is None else codec.channels.cpu()
                cpu = tt.TorchCodec(codec.d, codec.bits, codec.mode, codec.seed, channels=channels)
                records = _stored(cache, b, r, c) if from_cache else cpu.encode(full[:c].transpose(0, 1))
                decoded = cpu.decode(records).transpose(0, 1)
                ctx = torch.where(_is_raw(b, r, c)[:, None, None], x[:c], decoded)
                x = torch.cat([ctx, x[c:]])
            (ks if codec is b.k_codec else vs).append(x.transpose(0, 1)[None])
        q = b.query[starts[r] : starts[r + 1]].float().cpu().transpose(0, 1)[None]
        allowed = torch.arange(c + n)[None] <= (c + torch.arange(n))[:, None]
        o = sdpa(q, ks[0], vs[0], attn_mask=allowed, scale=b.scale, enable_gqa=True)
        out[starts[r] : starts[r + 1]] = o[0].transpose(0, 1)
    return out


def run(b: Batch) -> torch.Tensor:
    raw = b.raw or (None, None, None)
    return tt.paged_attention(
        b.query, b.key, b.value, b.k_cache, b.v_cache, b.block_table, b.seq_lens, b.query_start_loc,
        b.scale, b.k_codec, b.v_codec, raw_k=raw[0], raw_v=raw[1], raw_slot_of_block=raw[2],
    )


# ------------------------------------------------------------------------------------------ CPU tests
@pytest.mark.parametrize("raw_mode", ["none", "window"])
@pytest.mark.parametrize("block_size", [16, 32], ids=lambda s: f"bs{s}")
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("group", [1, 3], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_sdpa_on_decoded(scenario: str, group: int, d: int, block_size: int, raw_mode: str) -> None:
    b = make_batch(SCENARIOS[scenario], group, d, block_size, raw_mode)
    out = run(b)
    assert out.shape == b.query.shape and out.dtype == b.query.dtype
    torch.testing.assert_close(out, reference(b), rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(out[-2:]) == 0, "padding rows must stay zero"


@pytest.mark.parametrize("block_size", [16, 32], ids=lambda s: f"bs{s}")
@pytest.mark.parametrize("group", [1, 3], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_raw_everywhere_matches_sdpa_on_originals(scenario: str, group: int, block_size: int) -> None:
    b = make_batch(SCENARIOS[scenario], group, 64, block_size, "all")
    starts, seq = b.query_start_loc.tolist(), b.seq_lens.tolist()
    want = torch.zeros(b.query.shape)
    for r in range(len(seq)):
        n = starts[r + 1] - starts[r]
        q = b.query[starts[r] : starts[r + 1]].transpose(0, 1)[None]
        k, v = (x.transpose(0, 1)[None] for x in (b.full_k[r], b.full_v[r]))
        allowed = torch.arange(seq[r])[None] <= (seq[r] - n + torch.arange(n))[:, None]
        want[starts[r] : starts[r + 1]] = sdpa(q, k, v, attn_mask=allowed, scale=b.scale,
                                               enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(run(b), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_half_dtypes(dtype: torch.dtype) -> None:
    b = make_batch(SCENARIOS["mixed_prefill_decode"], 3, 64, 16, "window", dtype=dtype)
    out = run(b)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(b), rtol=2e-2, atol=2e-2)


def test_write_compressed_scatters_records_and_skips_padding() -> None:
    b = make_batch(SCENARIOS["mixed_prefill_decode"], 1, 64, 16, "none")
    block_size = b.k_cache.shape[1]
    written = torch.zeros(b.k_cache.shape[:2], dtype=torch.bool)
    for r, length in enumerate(b.seq_lens.tolist()):
        records = b.k_codec.encode(b.full_k[r].transpose(0, 1))
        assert torch.equal(_stored(b.k_cache, b, r, length), records)
        pos = torch.arange(length)
        written[b.block_table[r, pos // block_size].long(), pos % block_size] = True
    # Every slot no token maps to (padding, spare blocks, block tails) still holds its 0xFF bytes.
    assert bool((b.k_cache[~written] == 255).all()) and bool((b.v_cache[~written] == 255).all())


def test_raw_blocks_needed() -> None:
    block_table = torch.tensor([[7, 3, 9, 4, -1], [2, 8, -1, -1, -1]], dtype=torch.int32)
    # Sequence 0: 70 tokens (blocks 0-4 in use, bs 16); window 20 covers positions 50-69 -> logical 3, 4.
    needed = tt.raw_blocks_needed(block_table, torch.tensor([70, 17]), 16, window=20, sink_tokens=4)
    assert needed.tolist() == [2, 4, 7, 8]
    none = tt.raw_blocks_needed(block_table, torch.tensor([70, 17]), 16, window=0, sink_tokens=0)
    assert none.numel() == 0
    assert tt.raw_blocks_needed(block_table, torch.tensor([70, 17]), 16, 0, 4).tolist() == [2, 7]


def test_channels_fixed_by_first_write() -> None:
    b = make_batch(SCENARIOS["many_decodes"], 1, 64, 16, "none")
    assert b.k_codec.channels is not None and b.k_codec.channels.shape == (KV_HEADS, 64)
    assert b.v_codec.channels is None  # integer bits: no split


@pytest.mark.parametrize("physical", ["BHNC", "BNHC"])
def test_packed_vllm_cache_views(physical: str) -> None:
    """Writes and attention through ``split_kv_cache`` views of vLLM's packed [B, H, N, R_k + R_v]."""
    b = make_batch(SCENARIOS["chunked_prefill"], 3, 64, 16, "window")
    num_blocks, block_size, h, _ = b.k_cache.shape
    state = tt.kv_state_bytes(b.k_codec, b.v_codec)
    if physical == "BHNC":
        kv_cache = torch.full((num_blocks, h, block_size, state), 255, dtype=torch.uint8)
    else:  # vLLM's LBNHC layout: logical [B, H, N, C] over physical [B, N, H, C]
        kv_cache = torch.full((num_blocks, block_size, h, state), 255, dtype=torch.uint8).transpose(1, 2)
    k_view, v_view = tt.split_kv_cache(kv_cache, b.k_codec, b.v_codec)
    for r, length in enumerate(b.seq_lens.tolist()):
        slots = torch.tensor(_slots(b.block_table, r, range(length), block_size))
        tt.write_compressed(k_view, v_view, b.full_k[r], b.full_v[r], slots, b.k_codec, b.v_codec)
    assert torch.equal(k_view, b.k_cache) and torch.equal(v_view, b.v_cache)
    out = torch.full_like(b.query, 7.0)
    raw = b.raw
    assert raw is not None
    tt.paged_attention(b.query, b.key, b.value, k_view, v_view, b.block_table, b.seq_lens,
                       b.query_start_loc, b.scale, b.k_codec, b.v_codec, *raw, out=out)
    n = int(b.query_start_loc[-1])
    assert torch.equal(out[:n], run(b)[:n]) and bool((out[n:] == 7.0).all())
    with pytest.raises(ValueError, match="kv_cache states are 60 bytes but .* need 32 \\+ 32 = 64"):
        tt.split_kv_cache(kv_cache, b.k_codec, b.k_codec)


# ----------------------------------------------------------------------------------------- bad input
def _bad(b: Batch, **override: object) -> None:
    args = dict(query=b.query, key=b.key, value=b.value, k_cache=b.k_cache, v_cache=b.v_cache,
                block_table=b.block_table, seq_lens=b.seq_lens, query_start_loc=b.query_start_loc,
                scale=b.scale, k_codec=b.k_codec, v_codec=b.v_codec)
    args.update(override)
    tt.paged_attention(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small() -> Batch:
    return make_batch(SCENARIOS["mixed_prefill_decode"], 3, 64, 16, "none")


def test_bad_head_dim(small: Batch) -> None:
    with pytest.raises(ValueError, match=r"query must be \[32, a multiple of 2"
                       r" heads, 64\], got \(32, 6, 32\)"):
        _bad(small, query=small.query[..., :32])
    with pytest.raises(ValueError, match="k_codec has head_dim d=128 but key has head_dim 64"):
        _bad(small, k_codec=tt.TorchCodec(128, 3.5, "mse", 0))


def test_bad_num_heads(small: Batch) -> None:
    with pytest.raises(ValueError, match=r"key must be \[num_tokens, 2, 64\] to match"
                       r" the cache, got \(32, 1, 64\)"):
        _bad(small, key=small.key[:, :1], value=small.value[:, :1])
    with pytest.raises(ValueError, match=r"query must be \[32, a multiple of 2"
                       r" heads, 64\], got \(32, 5, 64\)"):
        _bad(small, query=small.query[:, :5])


def test_bad_dtypes(small: Batch) -> None:
    with pytest.raises(ValueError, match="query has dtype float64"):
        _bad(small, query=small.query.double())
    with pytest.raises(ValueError, match="key has dtype int32"):
        _bad(small, key=small.key.int())
    with pytest.raises(ValueError, match=r"k_cache must be uint8 \[num_blocks,"
                       r" block_size, num_kv_heads, 32\]"):
        _bad(small, k_cache=small.k_cache.to(torch.int8))


def test_bad_record_size(small: Batch) -> None:
    with pytest.raises(ValueError, match=r"k_cache must be uint8 \[num_blocks, block_size, num_kv_heads,"
                       r" 28\] for .*bits=3\.0.*got uint8 \(.*, 32\)"):
        _bad(small, k_codec=tt.TorchCodec(64, 3.0, "mse", 0))
    with pytest.raises(ValueError, match=r"v_cache must be uint8 \[num_blocks, block_size, num_kv_heads,"
                       r" 32\] for .*bits=3\.5.*got uint8 \(.*, 28\)"):
        tt.write_compressed(small.k_cache, small.v_cache, small.key, small.value,
                            torch.tensor([0]), small.k_codec, tt.TorchCodec(64, 3.5, "mse", 0))


def test_bad_metadata(small: Batch) -> None:
    with pytest.raises(ValueError, match="seq_lens needs 4 entries"):
        _bad(small, seq_lens=small.seq_lens[:3])
    with pytest.raises(ValueError, match="raw_k, raw_v and raw_slot_of_block must be given together"):
        _bad(small, raw_k=torch.zeros(1, 16, 2, 64))


# --------------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("raw_mode", ["none", "window", "all"])
@pytest.mark.parametrize("group", [1, 3], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cuda_matches_sdpa_on_decoded(scenario: str, group: int, raw_mode: str) -> None:
    b = make_batch(SCENARIOS[scenario], group, 128, 16, raw_mode, device="cuda")
    out = run(b)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), reference(b, from_cache=True), rtol=1e-3, atol=1e-4)
