"""The raw side pool: which physical blocks hold an uncompressed copy, and how much memory it takes.

vLLM's pages are uniform and shared by prefix caching, so the compressed cache is always complete
(``turboquant_torch.paged.write_compressed`` writes every token) and a small side pool of raw blocks
holds *extra* copies of the blocks that lie in some running sequence's recent window
(``TQ_RAW_WINDOW`` tokens) or hold its sinks (its first block). Attention reads a token raw when
its block has a copy, else decodes it.

Rules kept by ``RawSlotManager.step`` (called once per scheduler step, before any layer runs):

- A raw row is granted only to a block whose first token is written in this step (a *fresh* block:
  newly allocated, filled from offset 0 on), so a raw copy always holds every token of its block.
  Blocks already written (prefix-cache hits, blocks that left and re-entered no window) are read
  compressed: a quality cost only.
- A fresh block that still holds a row from an earlier owner keeps it when needed (it is rewritten
  from offset 0 in this step) and gives it back otherwise: stale copies are never read.
- Rows of blocks no scheduled sequence needs are kept (sequences not scheduled in this step keep
  their copies) until a needed fresh block finds no free row; then the least recently needed one is
  evicted. When the pool is exhausted a block simply stays compressed.

Memory: the pool holds whole sequences' windows and sinks (``blocks_per_seq`` rows each) for
``raw_seqs`` sequences (``TQ_RAW_SEQS``, default vLLM's ``max_num_seqs``), capped at ``TQ_RAW_SHARE`` of
the KV-cache budget (``sizing.plan_raw_pool``); that memory is reserved OUT OF the budget (the worker
subtracts it before vLLM sizes its block pool), so vLLM's capacity report is honest. Sequences beyond
the pool find no free row and read their recent tokens compressed; the engine always starts.
"""

from __future__ import annotations

import torch
from torch import Tensor
from turboquant_torch.paged import raw_blocks_needed

from turboquant_codec import _validate


def blocks_per_seq(block_size: int, window: int, sink_tokens: int) -> int:
    """Most blocks one sequence's window plus sinks can touch (0 when both are off)."""
    block_size = _validate.integer(block_size, "block_size", 1)
    window, sink_tokens = _validate.integer(window, "window"), _validate.integer(sink_tokens, "sink_tokens")
    win = (window - 1) // block_size + 2 if window > 0 else 0
    sinks = -(-sink_tokens // block_size) if sink_tokens > 0 else 0
    return win + sinks


def raw_pool_blocks(raw_seqs: int, block_size: int, window: int, sink_tokens: int) -> int:
    """Rows of the raw pool for ``raw_seqs`` concurrent sequences."""
    return max(0, int(raw_seqs)) * blocks_per_seq(block_size, window, sink_tokens)


def raw_pool_bytes(num_raw_blocks: int, num_layers: int, block_size: int, num_kv_heads: int,
                   head_dim: int, dtype_bytes: int) -> int:
    """Bytes of the raw pools of all layers (K and V, model dtype)."""
    return 2 * num_raw_blocks * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes


class RawSlotManager:
    """Maps physical blocks to raw-pool rows (``raw_slot_of_block``), step by step.

    Parameters
    ----------
    num_blocks : int
        Physical blocks of the paged cache.
    num_raw_blocks : int
        Rows of the raw pool.
    block_size, window, sink_tokens : int
    device : torch.device
        Where ``raw_slot_of_block`` lives (the cache's device).
    """

    def __init__(self, num_blocks: int, num_raw_blocks: int, block_size: int, window: int,
                 sink_tokens: int, device: torch.device | str = "cpu") -> None:
        self.num_blocks = _validate.integer(num_blocks, "num_blocks", 0)
        self.num_raw_blocks = _validate.integer(num_raw_blocks, "num_raw_blocks", 0)
        self.block_size = _validate.integer(block_size, "block_size", 1)
        self.window = _validate.integer(window, "window", 0)
        self.sink_tokens = _validate.integer(sink_tokens, "sink_tokens", 0)
        self.raw_slot_of_block = torch.full((self.num_blocks,), -1, dtype=torch.int32, device=device)
        self._row_of: dict[int, int] = {}  # block -> row (host mirror of raw_slot_of_block)
        self._block_of: list[int] = [-1] * self.num_raw_blocks
        self._last_needed: list[int] = [0] * self.num_raw_blocks
        self._free: list[int] = list(range(self.num_raw_blocks - 1, -1, -1))
        self._step = 0
        self.stats = {"granted": 0, "evicted": 0, "refused": 0, "stale_dropped": 0}

    @property
    def enabled(self) -> bool:
        return self.num_raw_blocks > 0 and (self.window > 0 or self.sink_tokens > 0)

    def rows_in_use(self) -> int:
        return len(self._row_of)

    def step(self, block_table: Tensor, seq_lens: Tensor, query_lens: Tensor) -> Tensor:
        """Update the map for a step that writes ``query_lens`` new tokens per request.

        Parameters
        ----------
        block_table : Tensor, [B, max_blocks] int (any device; read on the host)
        seq_lens : Tensor, [B] int, context lengths including this step's tokens
        query_lens : Tensor, [B] int, tokens written in this step

        Returns
        -------
        Tensor, [num_blocks] int32: ``raw_slot_of_block`` (updated in place)
        """
        if not self.enabled:
            return self.raw_slot_of_block
        self._step += 1
        bt, seq, q = block_table.cpu().long(), seq_lens.cpu().long(), query_lens.cpu().long()
        needed = set(raw_blocks_needed(bt, seq, self.block_size, self.window, self.sink_tokens).tolist())
        # Fresh blocks: their first token lies among this step's new tokens.
        ctx = seq - q
        cols = torch.arange(bt.shape[1])[None] * self.block_size
        fresh_mask = (cols >= ctx[:, None]) & (cols < seq[:, None]) & (bt >= 0)
        fresh = bt[fresh_mask].tolist()
        changed: dict[int, int] = {}
        for block in fresh:
            row = self._row_of.get(block)
            if row is not None and block not in needed:
                self._release(block, row)
                changed[block] = -1
                self.stats["stale_dropped"] += 1
        for block in needed:
            row = self._row_of.get(block)
            if row is not None:
                self._last_needed[row] = self._step
        for block in fresh:
            if block not in needed or block in self._row_of:
                continue
            row = self._take_row(needed)
            if row is None:
                self.stats["refused"] += 1
                continue
            self._row_of[block], self._block_of[row], self._last_needed[row] = row, block, self._step
            changed[block] = row
            self.stats["granted"] += 1
        if changed:
            idx = torch.tensor(list(changed), dtype=torch.long)
            val = torch.tensor(list(changed.values()), dtype=torch.int32)
            self.raw_slot_of_block[idx.to(self.raw_slot_of_block.device)] = val.to(
                self.raw_slot_of_block.device)
        return self.raw_slot_of_block

    def _release(self, block: int, row: int) -> None:
        del self._row_of[block]
        self._block_of[row] = -1
        self._free.append(row)

    def _take_row(self, needed: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        # Evict the least recently needed row whose block no scheduled sequence needs now.
        best, best_step = None, None
        for row, block in enumerate(self._block_of):
            if block < 0 or block in needed:
                continue
            if best_step is None or self._last_needed[row] < best_step:
                best, best_step = row, self._last_needed[row]
        if best is None:
            return None
        block = self._block_of[best]
        self._release(block, best)
        self.raw_slot_of_block[block] = -1
        self.stats["evicted"] += 1
        return self._free.pop()
