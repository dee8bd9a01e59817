"""Time of one paged decode step's attention (``tq.paged_attention``, every request a decode) per GPU
backend, bits/mode and context length: 4 requests, 8 KV heads, 32 query heads, d=128, block size 16,
a random block table over vLLM's packed ``[num_blocks, H, 16, R_k + R_v]`` cache, a raw pool on each
request's first and last block.

The cache is written once in ``setup`` by ``tq.paged_write`` (kernels, tables and launch plans are
warm before timing); the timed function waits for the device. CPU backends are skipped (the host
paged path has its own benchmarks); so is everything without a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import turboquant_codec as tq
from turboquant_codec.config import CodecConfig
from turboquant_codec.paged_cache import PagedCache

from .common import (
    CONFIGS,
    KV_HEADS,
    Q_HEADS,
    TIMING,
    device_of,
    kv_like,
    parse_config,
    put,
    require,
    scaled,
    synchronizer,
)

GPU_BACKENDS = ("cupy_raw",)
CONTEXTS = (2048, 32768)
REQUESTS = 4
HEAD_DIM = 128
BLOCK = 16


class PagedDecode:
    params = (GPU_BACKENDS, CONFIGS, CONTEXTS)
    param_names = ("backend", "config", "context")
    repeat = TIMING["repeat"]
    warmup_time = TIMING["warmup_time"]
    sample_time = TIMING["sample_time"]
    min_run_count = TIMING["min_run_count"]
    timeout = 300

    def setup(self, backend: str, config: str, context: int) -> None:
        for op in ("paged_write", "paged_attention"):
            require(op, backend, HEAD_DIM, config, context)
        if device_of(backend) == "cpu":
            raise NotImplementedError("GPU backends only")
        self.backend = backend
        self.sync = synchronizer(backend)
        mode, bits = parse_config(config)
        rng = np.random.default_rng(1234)
        ctx = scaled(context)
        k_cfg, v_cfg = CodecConfig(HEAD_DIM, bits, mode, seed=1), CodecConfig(HEAD_DIM, bits, mode, seed=2)
        rk = k_cfg.record_bytes
        per = -(-(ctx + 1) // BLOCK)
        nb = REQUESTS * per + 2
        table = rng.permutation(nb)[: REQUESTS * per].reshape(REQUESTS, per).astype(np.int32)
        rsb = np.full(nb, -1, np.int32)
        raw_blocks = np.unique(np.concatenate([table[:, 0], table[:, -1]]))
        rsb[raw_blocks] = np.arange(raw_blocks.size)
        packed = put(backend, np.zeros((nb, KV_HEADS, BLOCK, rk + v_cfg.record_bytes), np.uint8))
        raw = np.zeros((raw_blocks.size, BLOCK, KV_HEADS, HEAD_DIM), np.float16)
        cache = PagedCache(packed[..., :rk].transpose(0, 2, 1, 3), packed[..., rk:].transpose(0, 2, 1, 3),
                           k_cfg, v_cfg, raw_k=put(backend, raw), raw_v=put(backend, raw),
                           raw_slot_of_block=put(backend, rsb))
        pos = np.tile(np.arange(ctx), REQUESTS)
        req = np.repeat(np.arange(REQUESTS), ctx)
        slots = put(backend, table[req, pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK)
        keys = put(backend, kv_like(rng, (pos.size, KV_HEADS, HEAD_DIM)).astype(np.float16))
        values = put(backend, rng.standard_normal((pos.size, KV_HEADS, HEAD_DIM)).astype(np.float16))
        self.cache = tq.paged_write(cache, keys, values, slots, backend=backend)
        self.args: tuple[Any, ...] = (
            put(backend, rng.standard_normal((REQUESTS, Q_HEADS, HEAD_DIM)).astype(np.float16)),
            put(backend, rng.standard_normal((REQUESTS, KV_HEADS, HEAD_DIM)).astype(np.float16)),
            put(backend, rng.standard_normal((REQUESTS, KV_HEADS, HEAD_DIM)).astype(np.float16)),
            put(backend, table), put(backend, np.full(REQUESTS, ctx + 1, np.int32)),
            put(backend, np.arange(REQUESTS + 1, dtype=np.int32)),
        )
        self.out = put(backend, np.zeros((REQUESTS, Q_HEADS, HEAD_DIM), np.float16))
        self.call()  # warm-up: kernels, tables, launch plans
        self.sync()

    def call(self) -> Any:
        return tq.paged_attention(self.cache, *self.args, scale=HEAD_DIM**-0.5, out=self.out,
                                  num_decodes=REQUESTS, backend=self.backend)

    def time_paged_decode(self, *params: Any) -> None:
        self.call()
        self.sync()
