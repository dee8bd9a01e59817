"""Paged compressed KV-cache ops on torch tensors: what a vLLM attention backend calls, so its glue
stays thin.

The layout, the metadata and the rules are ``turboquant_codec.paged_cache``'s (one layer: K and V
record caches ``[num_blocks, block_size, H, R]``, a raw side pool with its ``raw_slot_of_block`` map,
``block_table`` / ``seq_lens`` / ``query_start_loc`` per step). vLLM (0.32) hands a backend one uint8
tensor per layer, logical ``[num_blocks, H, block_size, C]`` (physical order set by its KV-cache
layout), where the backend's ``customize_spec`` chooses ``C`` bytes per (token, head); with
``C = kv_state_bytes(k_codec, v_codec) = R_k + R_v``, ``split_kv_cache`` returns the two views the
ops read and write through.

Ops (``torch.library``, namespace ``turboquant``, with fake implementations; both mutate their
cache / output arguments and return nothing, so they capture in CUDA graphs)::

    turboquant::paged_write(k_cache!, v_cache!, key, value, slot_mapping, k_channels?, v_channels?,
                            raw_k!?, raw_v!?, raw_slot_of_block?, k_bits, k_mode, k_seed, v_bits,
                            v_mode, v_seed, backend, k_rotation="haar", v_rotation="haar")
    turboquant::paged_attention(out!, query, key, value, k_cache, v_cache, k_channels?, v_channels?,
                                raw_k?, raw_v?, raw_slot_of_block?, block_table, seq_lens,
                                query_start_loc, scale, num_decodes, k_bits, ... v_seed, backend,
                                k_rotation="haar", v_rotation="haar")

CPU tensors run on zero-copy NumPy views (``numba_cpu`` for decodes, else the NumPy reference);
CUDA tensors run the GPU backends (``cupy_raw``). ``TorchCodec`` keeps each layer's channel
permutations: the first ``write_compressed`` with a non-padding token fixes them from that batch
(a warm-up or CUDA-graph capture that writes dummy data must come after calibration, or reset
``codec.channels`` afterwards). No codec maths here.
"""

from __future__ import annotations

import torch
from torch import Tensor

import turboquant_codec as tq
from turboquant_codec import _validate
from turboquant_codec.paged import check_attention, check_write

from .ops import TorchCodec, make_config, seed_arg


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
    _validate.int_array(block_table, "block_table", 2)
    _validate.int_array(seq_lens, "seq_lens", 1)
    block_size = _validate.integer(block_size, "block_size", 1)
    window = _validate.integer(window, "window", 0)
    sink_tokens = _validate.integer(sink_tokens, "sink_tokens", 0)
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




# ---------------------------------------------------------------------------------------------- ops
def _cache(k_cache: Tensor, v_cache: Tensor, k_channels: Tensor | None, v_channels: Tensor | None,
           raw_k: Tensor | None, raw_v: Tensor | None, raw_slot_of_block: Tensor | None,
           k_cfg: tq.CodecConfig, v_cfg: tq.CodecConfig) -> tq.PagedCache:
    return tq.PagedCache(k_cache, v_cache, k_cfg, v_cfg, k_channels if k_cfg.split else None,
                         v_channels if v_cfg.split else None, raw_k, raw_v, raw_slot_of_block)


def _op_cache(key: Tensor, k_cache: Tensor, v_cache: Tensor, k_channels: Tensor | None,
              v_channels: Tensor | None, raw_k: Tensor | None, raw_v: Tensor | None,
              raw_slot_of_block: Tensor | None, k_bits: float, k_mode: str, k_seed: int, v_bits: float,
              v_mode: str, v_seed: int, k_rotation: str, v_rotation: str) -> tq.PagedCache:
    """The cache an op's arguments describe (head dim from ``key``; seeds as the schema carries them)."""
    d = key.shape[-1]
    return _cache(k_cache, v_cache, k_channels, v_channels, raw_k, raw_v, raw_slot_of_block,
                  make_config(d, k_bits, k_mode, k_seed, k_rotation),
                  make_config(d, v_bits, v_mode, v_seed, v_rotation))


@torch.library.custom_op("turboquant::paged_write", mutates_args=("k_cache", "v_cache", "raw_k", "raw_v"))
def _paged_write_op(
    k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor, slot_mapping: Tensor,
    k_channels: Tensor | None, v_channels: Tensor | None, raw_k: Tensor | None, raw_v: Tensor | None,
    raw_slot_of_block: Tensor | None, k_bits: float, k_mode: str, k_seed: int, v_bits: float,
    v_mode: str, v_seed: int, backend: str, k_rotation: str = "haar", v_rotation: str = "haar",
) -> None:
    cache = _op_cache(key, k_cache, v_cache, k_channels, v_channels, raw_k, raw_v, raw_slot_of_block,
                      k_bits, k_mode, k_seed, v_bits, v_mode, v_seed, k_rotation, v_rotation)
    tq.paged_write(cache, key, value, slot_mapping, backend=backend)


@_paged_write_op.register_fake
def _(k_cache, v_cache, key, value, slot_mapping, k_channels, v_channels, raw_k, raw_v,
      raw_slot_of_block, k_bits, k_mode, k_seed, v_bits, v_mode, v_seed, backend, k_rotation="haar",
      v_rotation="haar"):
    check_write(_op_cache(key, k_cache, v_cache, k_channels, v_channels, raw_k, raw_v, raw_slot_of_block,
                          k_bits, k_mode, k_seed, v_bits, v_mode, v_seed, k_rotation, v_rotation),
                key, value, slot_mapping)


@torch.library.custom_op("turboquant::paged_attention", mutates_args=("out",))
def _paged_attention_op(
    out: Tensor, query: Tensor, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
    k_channels: Tensor | None, v_channels: Tensor | None, raw_k: Tensor | None, raw_v: Tensor | None,
    raw_slot_of_block: Tensor | None, block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
    scale: float, num_decodes: int, k_bits: float, k_mode: str, k_seed: int, v_bits: float,
    v_mode: str, v_seed: int, backend: str, k_rotation: str = "haar", v_rotation: str = "haar",
) -> None:
    cache = _op_cache(key, k_cache, v_cache, k_channels, v_channels, raw_k, raw_v, raw_slot_of_block,
                      k_bits, k_mode, k_seed, v_bits, v_mode, v_seed, k_rotation, v_rotation)
    tq.paged_attention(cache, query, key, value, block_table, seq_lens, query_start_loc, scale=scale,
                       out=out, num_decodes=None if num_decodes < 0 else num_decodes, backend=backend)


@_paged_attention_op.register_fake
def _(out, query, key, value, k_cache, v_cache, k_channels, v_channels, raw_k, raw_v,
      raw_slot_of_block, block_table, seq_lens, query_start_loc, scale, num_decodes, k_bits, k_mode,
      k_seed, v_bits, v_mode, v_seed, backend, k_rotation="haar", v_rotation="haar"):
    check_attention(_op_cache(key, k_cache, v_cache, k_channels, v_channels, raw_k, raw_v, raw_slot_of_block,
                              k_bits, k_mode, k_seed, v_bits, v_mode, v_seed, k_rotation, v_rotation),
                    query, key, value, block_table, seq_lens, query_start_loc, scale=scale, out=out,
                    num_decodes=None if num_decodes < 0 else num_decodes)


def _config_args(key: Tensor, k_codec: TorchCodec,
                 v_codec: TorchCodec) -> tuple[float, str, int, float, str, int]:
    """The op's configuration arguments; ValueError when a codec's head_dim is not the tokens'."""
    for name, codec in (("k_codec", k_codec), ("v_codec", v_codec)):
        if codec.d != key.shape[-1]:
            raise ValueError(f"{name} has head_dim d={codec.d} but key has head_dim {key.shape[-1]}")
    return (k_codec.bits, k_codec.mode, seed_arg(k_codec.seed), v_codec.bits, v_codec.mode,
            seed_arg(v_codec.seed))


def write_compressed(
    k_cache: Tensor,
    v_cache: Tensor,
    key: Tensor,
    value: Tensor,
    slot_mapping: Tensor,
    k_codec: TorchCodec,
    v_codec: TorchCodec,
    raw: tuple[Tensor, Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> None:
    """Encode new tokens' K/V into their slots, and copy them raw where their block has a raw row.

    Parameters
    ----------
    k_cache, v_cache : Tensor, [num_blocks, block_size, H, R_k / R_v], uint8 (any strides)
    key, value : Tensor, [num_tokens, H, d], float16/bfloat16/float32
        Rows past ``len(slot_mapping)`` (CUDA-graph padding) are ignored.
    slot_mapping : Tensor, [<= num_tokens], int
        ``block * block_size + offset``; negative entries are padding and skipped.
    k_codec, v_codec : TorchCodec
        An unset permutation is fixed from this batch's non-padding tokens (a host synchronisation,
        once per layer).
    raw : (raw_k, raw_v, raw_slot_of_block), optional
        The raw side pool ``[num_raw_blocks, block_size, H, d]`` x 2 and its ``[num_blocks]`` map.
    backend : str
        ``turboquant_codec`` backend name, or "auto" (by device and the capability table).
    """
    _validate.int_array(slot_mapping, "slot_mapping", 1)
    config = _config_args(key, k_codec, v_codec)
    raw_k, raw_v, raw_map = raw if raw is not None else (None, None, None)
    unset = [(c, x) for c, x in ((k_codec, key), (v_codec, value)) if c.split and c.channels is None]
    if unset:
        rows = torch.nonzero(slot_mapping >= 0).squeeze(1)
        if rows.numel() == 0:
            return  # nothing to write, nothing to calibrate on
        # A batch the write would refuse must not fix the channels: check it whole first, then
        # choose both codecs' permutations before keeping either.
        check_write(_cache(k_cache, v_cache, None, None, raw_k, raw_v, raw_map, k_codec.config,
                           v_codec.config), key, value, slot_mapping)
        chosen = [(c, c.choose_channels(x[rows].transpose(0, 1))) for c, x in unset]
        for codec, channels in chosen:
            assert channels is not None
            codec.keep_first_channels(channels)
    device = key.device
    torch.ops.turboquant.paged_write(
        k_cache, v_cache, key, value, slot_mapping, k_codec.channels_on(device), v_codec.channels_on(device),
        raw_k, raw_v, raw_map, *config, backend, k_codec.rotation, v_codec.rotation)


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
    num_decodes: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Causal attention of a batch mixing prefill and decode requests over the paged compressed cache.

    Each request attends to its cached context (raw where its block has a raw row, else from the
    codes) and to its own new tokens (raw, from ``key``/``value``), in one softmax.

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
        Cumulative query lengths; rows past ``query_start_loc[-1]`` are padding.
    scale : float
    k_codec, v_codec : TorchCodec
    raw_k, raw_v : Tensor, [num_raw_blocks, block_size, H, d], optional
    raw_slot_of_block : Tensor, [num_blocks], int32, optional
        All three or none.
    out : Tensor, [num_tokens, Hq, d], optional
        Written in place (vLLM's preallocated output); rows of padding tokens are left untouched.
    num_decodes : int, optional
        The first ``num_decodes`` requests have one new token each (vLLM orders decodes first);
        covering every request, it keeps a CUDA step free of host synchronisation.
    backend : str
        ``turboquant_codec`` backend name, or "auto" (by device and the capability table).

    Returns
    -------
    Tensor, [num_tokens, Hq, d], dtype of ``query`` (``out`` when given)
    """
    config = _config_args(key, k_codec, v_codec)
    if out is None:
        out = torch.zeros_like(query)
    device = query.device
    torch.ops.turboquant.paged_attention(
        out, query, key, value, k_cache, v_cache, k_codec.channels_on(device), v_codec.channels_on(device),
        raw_k, raw_v, raw_slot_of_block, block_table, seq_lens, query_start_loc,
        _validate.positive_finite(scale, "scale"),
        -1 if num_decodes is None else _validate.integer(num_decodes, "num_decodes", 0), *config, backend,
        k_codec.rotation, v_codec.rotation)
    return out
