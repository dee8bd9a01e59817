"""Time of one layer's paged decode step on the host (``numba_cpu``) at SmolLM2-135M's attention shape:
3 KV heads, 9 query heads, d=64, 3.5-bit mse K and V, float32, one request, block size 16, a raw
pool on its first and last blocks (the sinks and the recent window).

- ``time_step`` with ``path="op"``: the public ``tq.paged_attention`` (the host cache's values are
  checked on every call);
- ``path="decoder"``: a ``tq.PagedDecoder`` built once in ``setup`` (what ``TurboQuantCache`` calls
  per layer and step on the CPU): the cache and table checked once, the step's arrays per call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import turboquant_codec as tq
from turboquant_codec.config import CodecConfig
from turboquant_codec.paged_cache import PagedCache

from .common import Timed, kv_like, scaled

KV, QH, D, BITS, BLOCK = 3, 9, 64, 3.5, 16


class HostPagedDecode(Timed):
    params = (("op", "decoder"), (2048,))
    param_names = ("path", "context")

    def setup(self, path: str, context: int) -> None:
        if not tq.backends.availability("numba_cpu"):
            raise NotImplementedError(tq.backends.availability("numba_cpu").reason)
        rng = np.random.default_rng(1234)
        ctx = scaled(context)
        k_cfg, v_cfg = CodecConfig(D, BITS, "mse", seed=1), CodecConfig(D, BITS, "mse", seed=2)
        rk = k_cfg.record_bytes
        per = -(-(ctx + 1) // BLOCK)
        table = rng.permutation(per + 2)[:per].reshape(1, per).astype(np.int32)
        rsb = np.full(per + 2, -1, np.int32)
        rsb[[table[0, 0], table[0, -1]]] = [0, 1]
        packed = np.zeros((per + 2, KV, BLOCK, rk + v_cfg.record_bytes), np.uint8)
        cache = PagedCache(packed[..., :rk].transpose(0, 2, 1, 3), packed[..., rk:].transpose(0, 2, 1, 3),
                           k_cfg, v_cfg, raw_k=np.zeros((2, BLOCK, KV, D), np.float32),
                           raw_v=np.zeros((2, BLOCK, KV, D), np.float32), raw_slot_of_block=rsb)
        pos = np.arange(ctx)
        slots = table[0, pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK
        keys = kv_like(rng, (ctx, KV, D)).astype(np.float32)
        values = rng.standard_normal((ctx, KV, D)).astype(np.float32)
        self.cache = tq.paged_write(cache, keys, values, slots, backend="numpy")
        self.q = rng.standard_normal((1, QH, D)).astype(np.float32)
        self.k, self.v = (rng.standard_normal((1, KV, D)).astype(np.float32) for _ in range(2))
        self.table, self.seq = table, np.array([ctx + 1], np.int32)
        self.qsl = np.arange(2, dtype=np.int32)
        self.out = np.zeros_like(self.q)
        self.decoder = tq.PagedDecoder(self.cache, table, backend="numba_cpu")
        self.path = path
        self.time_step(path, context)  # compiles (or loads) the kernel outside the samples

    def time_step(self, path: str, context: int) -> Any:
        if self.path == "decoder":
            return self.decoder(self.q, self.k, self.v, self.seq, scale=D**-0.5, out=self.out)
        return tq.paged_attention(self.cache, self.q, self.k, self.v, self.table, self.seq, self.qsl,
                                  scale=D**-0.5, out=self.out, num_decodes=1, backend="numba_cpu")
