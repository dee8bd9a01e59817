"""``PagedCache``: one attention layer's paged compressed KV cache, as the paged ops see it.

Layout owned here (``R_k = k_config.record_bytes``, ``R_v = v_config.record_bytes``, ``H`` = KV heads,
``d`` = head dim)::

    k_cache            [num_blocks, block_size, H, R_k]  uint8   one codec record per (slot, KV head);
    v_cache            [num_blocks, block_size, H, R_v]  uint8   any strides with unit stride in the
                                                                 last dimension (views of one packed
                                                                 K+V tensor per layer are the norm)
    k_channels,        [H, d] uint16 or None             per-KV-head outlier permutation (split
    v_channels                                           bits); None before the first write
    raw_k, raw_v       [num_raw_blocks, block_size, H, d]  float   raw side pool (same block_size)
    raw_slot_of_block  [num_blocks] int32                raw-pool row of a physical block, -1 = none

and the per-step metadata of the paged ops::

    slot               block * block_size + offset; negative slots are padding and skipped
    slot_mapping       [<= num_tokens] int               slot of each new token
    block_table        [B, max_blocks] int32             request r's logical block j -> physical
                                                         block; entries past ceil(seq_lens[r] /
                                                         block_size) are never read
    seq_lens           [B] int32                         context length, the new tokens included
    query_start_loc    [B + 1] int32                     request r's new tokens are query rows
                                                         query_start_loc[r]:query_start_loc[r + 1]
    num_decodes        int or None                       the first num_decodes requests have one
                                                         new token each, or none (padding requests
                                                         of a CUDA-graph batch; vLLM orders
                                                         decodes first);
                                                         None: found from query_start_loc (a host
                                                         synchronisation on a GPU)

Rules:

- ``paged_write`` encodes every new token into the compressed cache, so it is always complete, and
  copies it into the raw pool where its block has a raw row; the raw pool holds *extra* copies.
  Attention reads a context token raw when its physical block has a raw row, else from its records.
- A block has a raw row when its ``raw_slot_of_block`` entry lies in 0 .. num_raw_blocks - 1. Any
  other entry (-1, another negative, or one past the raw pool) means no raw row, in every backend and
  kernel: attention reads the block from its records and ``paged_write`` copies nothing raw. (The
  public ops refuse entries outside -1 .. num_raw_blocks - 1 where they can see them without a host
  synchronisation; GPU caches are not read back, so the backends follow this rule for what they get.)
- A request's own new tokens (the ``key``/``value`` arguments) are always read raw, and query token
  ``i`` of request ``r`` sits at position ``seq_lens[r] - q_len_r + i`` (causal mask).
- A request's output depends on its own context only, never on the batch it shares a step with.
- Channel permutations are fixed per (layer, KV head): the first ``paged_write`` with ``channels``
  None picks them from that batch's non-padding tokens and returns them; the caller keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .config import CodecConfig


@dataclass(frozen=True, eq=False)
class PagedCache:
    """One layer's paged compressed KV cache (arrays of one library, on one device).

    Attributes
    ----------
    k_cache, v_cache : array, [num_blocks, block_size, H, R_k / R_v], uint8
    k_config, v_config : CodecConfig
    k_channels, v_channels : array, [H, d], uint16, or None
    raw_k, raw_v : array, [num_raw_blocks, block_size, H, d], float16/bfloat16/float32, or None
    raw_slot_of_block : array, [num_blocks], int32, or None
        ``raw_k``, ``raw_v`` and ``raw_slot_of_block``: all three or none.
    """

    k_cache: Any
    v_cache: Any
    k_config: CodecConfig
    v_config: CodecConfig
    k_channels: Any = None
    v_channels: Any = None
    raw_k: Any = None
    raw_v: Any = None
    raw_slot_of_block: Any = None

    @property
    def num_blocks(self) -> int:
        return int(self.k_cache.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.k_cache.shape[1])

    @property
    def num_kv_heads(self) -> int:
        return int(self.k_cache.shape[2])

    @property
    def head_dim(self) -> int:
        return self.k_config.d

    @property
    def has_raw(self) -> bool:
        return self.raw_slot_of_block is not None

    def with_channels(self, k_channels: Any, v_channels: Any) -> PagedCache:
        """The same cache with these channel permutations."""
        return replace(self, k_channels=k_channels, v_channels=v_channels)

    def converted(self, asarray: Any) -> PagedCache:
        """Every array through ``asarray`` (a backend's own array type; views, not copies)."""
        def conv(a: Any) -> Any:
            return None if a is None else asarray(a)

        return PagedCache(conv(self.k_cache), conv(self.v_cache), self.k_config, self.v_config,
                          conv(self.k_channels), conv(self.v_channels), conv(self.raw_k),
                          conv(self.raw_v), conv(self.raw_slot_of_block))
