"""Paged compressed KV-cache ops: what a vLLM attention backend calls, so its glue stays thin.

Layout owned here (one attention layer; a convention, no parameters; ``R_k = k_codec.record_bytes``,
``R_v = v_codec.record_bytes``, ``H`` = KV heads, ``d`` = head dim)::

    k_cache             [num_blocks, block_size, H, R_k]  uint8   one codec record per (slot, KV head)
    v_cache             [num_blocks, block_size, H, R_v]  uint8
    slot                block * block_size + offset; negative slots are padding and skipped
    slot_mapping        [num_tokens] int                  slot of each new token
    block_table         [B, max_blocks] int               request r's logical block j -> physical block
    seq_lens            [B] int                           context length, the new tokens included
    query_start_loc     [B + 1] int                       request r's new tokens are rows
                                                          query_start_loc[r]:query_start_loc[r + 1]
    raw_k, raw_v        [num_raw_blocks, block_size, H, d] float   raw side pool (same block_size)
    raw_slot_of_block   [num_blocks] int32                raw-pool row of a physical block, -1 = none
    k_codec.channels    [H, d] uint16                     per-KV-head outlier permutation (split bits)

vLLM (0.32, ``/work/notes/vllm.md``) hands a backend one uint8 tensor per layer, logical
``[num_blocks, H, block_size, C]`` (physical order set by its KV-cache layout), where the backend's
``customize_spec`` chooses ``C`` bytes per (token, head). With ``C = kv_state_bytes(k_codec,
v_codec) = R_k + R_v``, ``split_kv_cache`` returns the two views above (K records first in each
state); every op here reads and writes through such strided views.

Rules:

- ``write_compressed`` always writes every new token's records, so the compressed cache is complete;
  the raw pool holds extra copies. Attention reads a context token raw when its physical block has a
  raw copy (``raw_slot_of_block[block] >= 0``), else decodes its records.
- The request's own new tokens (``key``/``value`` arguments) are always read raw, and query token
  ``i`` of request ``r`` sits at position ``seq_lens[r] - q_len_r + i`` (causal mask).
- Channel permutations are fixed per (layer, KV head) by the codec object: ``TorchCodec.calibrate``
  sets them from a calibration batch; otherwise the first ``write_compressed`` with at least one
  non-padding token fixes them from that batch (in serving, the first prompt). A warm-up or
  CUDA-graph capture that writes dummy data must come after calibration, or reset
  ``codec.channels`` afterwards, else its dummy data picks the outlier channels.
- A raw copy only holds tokens written while it existed: grant raw slots to blocks before their
  tokens are written (the recent window only moves forward, and a sequence's first block is
  written first), never to an already-written block (e.g. a prefix-cache hit) without filling it.

The codec maths stays in ``turboquant_codec`` (through ``turboquant_torch.ops``); here are gathers,
scatters, masks and a float32 softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import TorchCodec, check_float

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ----------------------------------------------------------------------------------------- validation
def _check_int(t: Tensor, name: str, ndim: int) -> None:
    if not isinstance(t, Tensor) or t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")


def _check_cache(cache: Tensor, x: Tensor, codec: TorchCodec, which: str) -> None:
    """``{which}_cache`` against the new tokens ``x`` [T, H, d] and the codec: ValueError naming both."""
    name, xname, cname = f"{which}_cache", ("key" if which == "k" else "value"), f"{which}_codec"
    check_float(x, xname)
    if x.dim() != 3:
        raise ValueError(f"{xname} must be [num_tokens, num_kv_heads, head_dim], got {tuple(x.shape)}")
    if not isinstance(cache, Tensor) or cache.dtype != torch.uint8 or cache.dim() != 4:
        raise ValueError(
            f"{name} must be a uint8 tensor [num_blocks, block_size, num_kv_heads, record_bytes], got "
            f"{getattr(cache, 'dtype', type(cache).__name__)} {tuple(getattr(cache, 'shape', ()))}"
        )
    if cache.shape[2] != x.shape[1]:
        raise ValueError(f"{name} has {cache.shape[2]} KV heads but {xname} has {x.shape[1]}")
    if codec.d != x.shape[2]:
        raise ValueError(f"{cname} has head_dim d={codec.d} but {xname} has head_dim {x.shape[2]}")
    if cache.shape[3] != codec.record_bytes:
        raise ValueError(
            f"{name} records are {cache.shape[3]} bytes but {cname} (d={codec.d}, bits={codec.bits:g}, "
            f"mode={codec.mode!r}) needs {codec.record_bytes}"
        )
    if cache.device != x.device:
        raise ValueError(f"{name} is on {cache.device} but {xname} is on {x.device}")


def _check_kv(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor,
              k_codec: TorchCodec, v_codec: TorchCodec) -> None:
    _check_cache(k_cache, key, k_codec, "k")
    _check_cache(v_cache, value, v_codec, "v")
    if tuple(key.shape) != tuple(value.shape):
        raise ValueError(f"key has shape {tuple(key.shape)} but value has {tuple(value.shape)}")
    if tuple(k_cache.shape[:3]) != tuple(v_cache.shape[:3]):
        raise ValueError(
            f"k_cache blocks {tuple(k_cache.shape[:3])} differ from v_cache blocks {tuple(v_cache.shape[:3])}"
        )


def _check_raw(raw_k: Tensor | None, raw_v: Tensor | None, raw_slot_of_block: Tensor | None,
               k_cache: Tensor, head_dim: int) -> bool:
    """Whether a raw pool is given; ValueError when it does not fit the cache."""
    given = [t is not None for t in (raw_k, raw_v, raw_slot_of_block)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("raw_k, raw_v and raw_slot_of_block must be given together")
    assert raw_k is not None and raw_v is not None and raw_slot_of_block is not None
    expected = (int(k_cache.shape[1]), int(k_cache.shape[2]), head_dim)
    for name, raw in (("raw_k", raw_k), ("raw_v", raw_v)):
        check_float(raw, name)
        if raw.dim() != 4 or tuple(raw.shape[1:]) != expected:
            raise ValueError(
                f"{name} must be [num_raw_blocks, block_size, num_kv_heads, head_dim] = [*, {expected[0]}, "
                f"{expected[1]}, {expected[2]}] to match k_cache, got {tuple(raw.shape)}"
            )
    _check_int(raw_slot_of_block, "raw_slot_of_block", 1)
    if raw_slot_of_block.shape[0] != k_cache.shape[0]:
        raise ValueError(
            f"raw_slot_of_block has {raw_slot_of_block.shape[0]} entries but k_cache has "
            f"{k_cache.shape[0]} blocks"
        )
    return True


def _valid_slots(slot_mapping: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Rows of the new tokens that are not padding, and their slots (int64)."""
    _check_int(slot_mapping, "slot_mapping", 1)
    if slot_mapping.shape[0] > num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but only {num_tokens} tokens")
    rows = torch.nonzero(slot_mapping >= 0).squeeze(1)
    return rows, slot_mapping[rows].long()


# ------------------------------------------------------------------------------------------- layout
def kv_state_bytes(k_codec: TorchCodec, v_codec: TorchCodec) -> int:
    """Bytes per (token, KV head) of a packed K+V cache: ``R_k + R_v``."""
    return k_codec.record_bytes + v_codec.record_bytes


def split_kv_cache(kv_cache: Tensor, k_codec: TorchCodec, v_codec: TorchCodec) -> tuple[Tensor, Tensor]:
    """Views ``k_cache``, ``v_cache`` [num_blocks, block_size, H, R] of a packed vLLM cache.

    Parameters
    ----------
    kv_cache : Tensor, [num_blocks, H, block_size, R_k + R_v], uint8
        vLLM's per-layer tensor (any strides): each (block, head, slot) state holds the K record,
        then the V record.

    Returns
    -------
    k_cache : Tensor, [num_blocks, block_size, H, R_k], uint8 (a view)
    v_cache : Tensor, [num_blocks, block_size, H, R_v], uint8 (a view)
    """
    state = kv_state_bytes(k_codec, v_codec)
    if not isinstance(kv_cache, Tensor) or kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4:
        raise ValueError(
            f"kv_cache must be a uint8 tensor [num_blocks, num_kv_heads, block_size, state_bytes], got "
            f"{getattr(kv_cache, 'dtype', type(kv_cache).__name__)} {tuple(getattr(kv_cache, 'shape', ()))}"
        )
    if kv_cache.shape[3] != state:
        raise ValueError(
            f"kv_cache states are {kv_cache.shape[3]} bytes but k_codec + v_codec records need "
            f"{k_codec.record_bytes} + {v_codec.record_bytes} = {state}"
        )
    r_k = k_codec.record_bytes
    return kv_cache[..., :r_k].transpose(1, 2), kv_cache[..., r_k:].transpose(1, 2)


# ---------------------------------------------------------------------------------------------- write
def write_compressed(
    k_cache: Tensor,
    v_cache: Tensor,
    key: Tensor,
    value: Tensor,
    slot_mapping: Tensor,
    k_codec: TorchCodec,
    v_codec: TorchCodec,
) -> None:
    """Encode new tokens' K/V and scatter the records into the paged cache (in place).

    Parameters
    ----------
    k_cache, v_cache : Tensor, [num_blocks, block_size, H, R_k / R_v], uint8
    key, value : Tensor, [num_tokens, H, d], float16/bfloat16/float32
        Rows past ``len(slot_mapping)`` (CUDA-graph padding) are ignored.
    slot_mapping : Tensor, [<= num_tokens], int
        ``block * block_size + offset``; negative entries are padding and skipped.
    k_codec, v_codec : TorchCodec
        Per-layer configurations; an unset permutation is fixed from this batch (module docstring).
    """
    _check_kv(k_cache, v_cache, key, value, k_codec, v_codec)
    rows, slots = _valid_slots(slot_mapping, key.shape[0])
    if rows.numel() == 0:
        return
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    for cache, x, codec in ((k_cache, key, k_codec), (v_cache, value, v_codec)):
        # One stream per KV head: [H, T, d], so each head keeps its own channel permutation.
        records = codec.encode(x[rows].transpose(0, 1).contiguous())
        # Advanced indexing writes through any strides (the cache may be a view of a larger pool).
        cache[blocks, offsets] = records.transpose(0, 1)


def write_raw(
    raw_k: Tensor,
    raw_v: Tensor,
    key: Tensor,
    value: Tensor,
    slot_mapping: Tensor,
    raw_slot_of_block: Tensor,
) -> None:
    """Copy new tokens' raw K/V into the side pool for the blocks that have a raw copy (in place).

    Parameters
    ----------
    raw_k, raw_v : Tensor, [num_raw_blocks, block_size, H, d], float
        ``block_size`` must be the paged cache's (it decodes ``slot_mapping``).
    key, value : Tensor, [num_tokens, H, d]
    slot_mapping : Tensor, [<= num_tokens], int
        Negative entries are padding and skipped.
    raw_slot_of_block : Tensor, [num_blocks], int32
        Raw-pool row of each physical block, -1 where it has none (those tokens are skipped).
    """
    for name, raw, x in (("raw_k", raw_k, key), ("raw_v", raw_v, value)):
        check_float(raw, name)
        check_float(x, "key" if name == "raw_k" else "value")
        if raw.dim() != 4 or x.dim() != 3 or tuple(raw.shape[2:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"{name} [num_raw_blocks, block_size, H, d] has shape {tuple(raw.shape)} but the new "
                f"tokens [num_tokens, H, d] have {tuple(x.shape)}"
            )
    _check_int(raw_slot_of_block, "raw_slot_of_block", 1)
    rows, slots = _valid_slots(slot_mapping, key.shape[0])
    block_size = raw_k.shape[1]
    raw_rows = raw_slot_of_block[slots // block_size].long()
    keep = torch.nonzero(raw_rows >= 0).squeeze(1)
    if keep.numel() == 0:
        return
    rows, raw_rows, offsets = rows[keep], raw_rows[keep], (slots % block_size)[keep]
    raw_k[raw_rows, offsets] = key[rows].to(raw_k.dtype)
    raw_v[raw_rows, offsets] = value[rows].to(raw_v.dtype)


def raw_blocks_needed(
    block_table: Tensor, seq_lens: Tensor, block_size: int, window: int, sink_tokens: int
) -> Tensor:
    """Physical blocks that should hold a raw copy: each sequence's recent window and sink blocks.

    Parameters
    ----------
    block_table : Tensor, [B, max_blocks], int
        Negative entries (unused) are ignored.
    seq_lens : Tensor, [B], int
        Tokens per sequence, the ones about to be written included.
    block_size : int
    window : int
        The last ``window`` tokens of each sequence are read raw (0: none).
    sink_tokens : int
        The first ``sink_tokens`` tokens of each sequence are read raw (0: none).

    Returns
    -------
    Tensor, [num_needed], int64
        Sorted unique physical block ids; blocks not listed can give their raw slot back.
    """
    _check_int(block_table, "block_table", 2)
    _check_int(seq_lens, "seq_lens", 1)
    if seq_lens.shape[0] != block_table.shape[0]:
        raise ValueError(
            f"seq_lens has {seq_lens.shape[0]} entries but block_table has {block_table.shape[0]} rows"
        )
    starts = torch.arange(block_table.shape[1], device=block_table.device) * block_size
    lens = seq_lens.long()[:, None]
    in_use = starts[None] < lens
    recent = (starts[None] + block_size) > (lens - window)
    sink = starts[None] < sink_tokens
    need = in_use & ((recent & (window > 0)) | sink) & (block_table >= 0)
    return torch.unique(block_table[need].long())


# ------------------------------------------------------------------------------------------ attention
def _context(
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    ctx_lens: Tensor,
    k_codec: TorchCodec,
    v_codec: TorchCodec,
    raw: tuple[Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every request's cached context as float32 K, V [C, H, d], with request ids and positions [C]."""
    device, (b, h), d = k_cache.device, (block_table.shape[0], k_cache.shape[2]), k_codec.d
    total = int(ctx_lens.sum())
    req = torch.repeat_interleave(torch.arange(b, device=device), ctx_lens)
    pos = torch.arange(total, device=device) - (torch.cumsum(ctx_lens, 0) - ctx_lens)[req]
    block_size = k_cache.shape[1]
    blocks, offsets = block_table[req, pos // block_size].long(), pos % block_size
    k = torch.empty(total, h, d, dtype=torch.float32, device=device)
    v = torch.empty(total, h, d, dtype=torch.float32, device=device)
    if raw is None:
        compressed, raw_rows = torch.arange(total, device=device), None
    else:
        raw_rows = raw[2][blocks].long()
        compressed = torch.nonzero(raw_rows < 0).squeeze(1)
        from_raw = torch.nonzero(raw_rows >= 0).squeeze(1)
        if from_raw.numel():
            k[from_raw] = raw[0][raw_rows[from_raw], offsets[from_raw]].float()
            v[from_raw] = raw[1][raw_rows[from_raw], offsets[from_raw]].float()
    if compressed.numel():
        for out, cache, codec, name in ((k, k_cache, k_codec, "k_codec"),
                                        (v, v_cache, v_codec, "v_codec")):
            if codec.split and codec.channels is None:
                raise ValueError(
                    f"{name} has no channel permutation yet: write_compressed or calibrate first"
                )
            # One batched decode of every compressed context token, one stream per KV head.
            records = cache[blocks[compressed], offsets[compressed]].transpose(0, 1).contiguous()
            out[compressed] = codec.decode(records).transpose(0, 1)
    return k, v, req, pos


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Masked softmax attention in float32, GQA by head groups.

    q [N, n, Hq, d], k/v [N, L, H, d], allowed [N, n, L] -> [N, n, Hq, d].
    """
    n_batch, n, hq, d = q.shape
    h = k.shape[2]
    qg = q.view(n_batch, n, h, hq // h, d)
    logits = torch.einsum("bnhgd,blhd->bhgnl", qg, k) * scale
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.einsum("bhgnl,blhd->bnhgd", weights, v).reshape(n_batch, n, hq, d)


def paged_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    k_codec: TorchCodec,
    v_codec: TorchCodec,
    raw_k: Tensor | None = None,
    raw_v: Tensor | None = None,
    raw_slot_of_block: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Causal attention of a batch mixing prefill and decode requests over the paged compressed cache.

    Each request attends to its cached context (raw where its block has a raw copy, else decoded)
    and to its own new tokens (raw, from ``key``/``value``), in one float32 softmax.

    Parameters
    ----------
    query : Tensor, [num_tokens, Hq, d], float16/bfloat16/float32
        ``Hq`` a multiple of ``H`` (query head ``i`` reads KV head ``i // (Hq // H)``).
    key, value : Tensor, [num_tokens, H, d]
        The new tokens; they need not have been written to the cache yet.
    k_cache, v_cache : Tensor, [num_blocks, block_size, H, R_k / R_v], uint8
    block_table : Tensor, [B, max_blocks], int
    seq_lens : Tensor, [B], int
        Context lengths including the new tokens.
    query_start_loc : Tensor, [B + 1], int
        Cumulative query lengths; rows past ``query_start_loc[-1]`` (padding) come back as zeros.
    scale : float
    k_codec, v_codec : TorchCodec
    raw_k, raw_v : Tensor, [num_raw_blocks, block_size, H, d], optional
    raw_slot_of_block : Tensor, [num_blocks], int32, optional
        All three or none.
    out : Tensor, [num_tokens, Hq, d], optional
        Written in place (vLLM's preallocated output); rows of padding tokens are left untouched.

    Returns
    -------
    Tensor, [num_tokens, Hq, d], dtype of ``query`` (``out`` when given)
    """
    _check_kv(k_cache, v_cache, key, value, k_codec, v_codec)
    check_float(query, "query")
    if query.dim() != 3 or query.shape[0] != key.shape[0]:
        raise ValueError(f"query must be [num_tokens={key.shape[0]}, Hq, d], got {tuple(query.shape)}")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"query has head_dim {query.shape[2]} but key has head_dim {key.shape[2]}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query has {query.shape[1]} heads, not a multiple of the {key.shape[1]} KV heads")
    for name, t, dims in (("block_table", block_table, 2), ("seq_lens", seq_lens, 1),
                          ("query_start_loc", query_start_loc, 1)):
        _check_int(t, name, dims)
    b = block_table.shape[0]
    if seq_lens.shape[0] != b or query_start_loc.shape[0] != b + 1:
        raise ValueError(
            f"block_table has {b} rows, so seq_lens needs {b} entries (got {seq_lens.shape[0]}) and "
            f"query_start_loc {b + 1} (got {query_start_loc.shape[0]})"
        )
    has_raw = _check_raw(raw_k, raw_v, raw_slot_of_block, k_cache, key.shape[2])
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")

    device = query.device
    starts = query_start_loc.to(device=device, dtype=torch.int64)
    seq = seq_lens.to(device=device, dtype=torch.int64)
    q_lens = starts[1:] - starts[:-1]
    ctx_lens = seq - q_lens
    if bool((ctx_lens < 0).any()) or int(starts[-1]) > query.shape[0]:
        raise ValueError(
            f"query_start_loc {starts.tolist()} does not fit seq_lens {seq.tolist()} and "
            f"{query.shape[0]} tokens"
        )
    needed_blocks = -(-int(seq.max()) // k_cache.shape[1]) if b else 0
    if needed_blocks > block_table.shape[1]:
        raise ValueError(
            f"seq_lens need {needed_blocks} blocks but block_table has {block_table.shape[1]} columns"
        )
    raw = (raw_k, raw_v, raw_slot_of_block) if has_raw else None
    k_ctx, v_ctx, ctx_req, ctx_pos = _context(
        k_cache, v_cache, block_table.to(device), ctx_lens, k_codec, v_codec, raw  # type: ignore[arg-type]
    )
    if out is None:
        out = torch.zeros_like(query)
    elif tuple(out.shape) != tuple(query.shape) or out.device != query.device:
        raise ValueError(f"out has shape {tuple(out.shape)} on {out.device} but query has "
                         f"{tuple(query.shape)} on {query.device}")
    h, d = key.shape[1], key.shape[2]

    # Decode requests (one new token): one padded batch, masked by length.
    dec = torch.nonzero(q_lens == 1).squeeze(1)
    if dec.numel():
        n_dec, length = dec.numel(), int(seq[dec].max())
        row_of = torch.full((b,), -1, dtype=torch.int64, device=device)
        row_of[dec] = torch.arange(n_dec, device=device)
        sel = torch.nonzero(row_of[ctx_req] >= 0).squeeze(1)
        kb = torch.zeros(n_dec, length, h, d, dtype=torch.float32, device=device)
        vb = torch.zeros_like(kb)
        kb[row_of[ctx_req[sel]], ctx_pos[sel]] = k_ctx[sel]
        vb[row_of[ctx_req[sel]], ctx_pos[sel]] = v_ctx[sel]
        tok = starts[dec]
        rows = torch.arange(n_dec, device=device)
        kb[rows, ctx_lens[dec]] = key[tok].float()
        vb[rows, ctx_lens[dec]] = value[tok].float()
        allowed = torch.arange(length, device=device)[None] < seq[dec][:, None]
        o = _attend(query[tok].float()[:, None], kb, vb, allowed[:, None], scale)
        out[tok] = o[:, 0].to(out.dtype)

    # Prefill and chunked-prefill requests: each a dense causal block, one at a time.
    ctx_start = (torch.cumsum(ctx_lens, 0) - ctx_lens).tolist()
    for r in torch.nonzero(q_lens > 1).squeeze(1).tolist():
        q0, q1, c, c0 = int(starts[r]), int(starts[r + 1]), int(ctx_lens[r]), ctx_start[r]
        kr = torch.cat([k_ctx[c0 : c0 + c], key[q0:q1].float()])[None]
        vr = torch.cat([v_ctx[c0 : c0 + c], value[q0:q1].float()])[None]
        n = q1 - q0
        allowed = torch.arange(c + n, device=device)[None] <= (c + torch.arange(n, device=device))[:, None]
        out[q0:q1] = _attend(query[q0:q1].float()[None], kr, vr, allowed[None], scale)[0].to(out.dtype)
    return out
