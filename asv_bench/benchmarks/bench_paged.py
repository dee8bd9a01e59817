"""Time of one paged decode step's attention (``tq.paged_attention``, every request a decode) per GPU
backend, bits/mode and context length, and of a whole decode step captured in a CUDA graph
(``PagedGraphStep``): 4 requests, 8 KV heads, 32 query heads, d=128, block size 16,
a random block table over vLLM's packed ``[num_blocks, H, 16, R_k + R_v]`` cache, a raw pool on each
request's first and last block.

The cache is written once in ``setup`` by ``tq.paged_write`` (kernels, tables and launch plans are
warm before timing); the timed function waits for the device. CPU backends are skipped (the host
paged path has its own benchmarks); so is everything without a GPU.

``PagedGraphStep`` is what the vLLM plugin's graph-captured decode step runs: per layer, the new
token's ``tq.paged_write`` beside ``tq.paged_attention`` (``turboquant_torch.write_beside``) on
torch tensors, ``LAYERS`` layers in one ``torch.cuda.CUDAGraph`` (every layer reads the same cache),
replayed.
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
    Timed,
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
LAYERS = 8


class PagedDecode(Timed):
    params = (GPU_BACKENDS, CONFIGS, CONTEXTS)
    param_names = ("backend", "config", "context")

    def setup(self, backend: str, config: str, context: int) -> None:
        for op in ("paged_write", "paged_attention"):
            require(op, backend, HEAD_DIM, config, context)
        if device_of(backend) == "cpu":
            raise NotImplementedError("GPU backends only")
        self.backend = backend
        self.sync = synchronizer(backend)
        self.scale = HEAD_DIM**-0.5
        mode, bits = parse_config(config)
        rng = np.random.default_rng(1234)
        ctx = scaled(context)
        k_cfg, v_cfg = CodecConfig(HEAD_DIM, bits, mode, seed=1), CodecConfig(HEAD_DIM, bits, mode, seed=2)
        rk = k_cfg.record_bytes
        per = -(-(ctx + 1) // BLOCK)
        nb = REQUESTS * per + 2
        table = rng.permutation(nb)[: REQUESTS * per].reshape(REQUESTS, per).astype(np.int32)
        # The slot of each request's new token (position ctx), for the graph step's write.
        self.new_slots = table[:, ctx // BLOCK].astype(np.int64) * BLOCK + ctx % BLOCK
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
        return tq.paged_attention(self.cache, *self.args, scale=self.scale, out=self.out,
                                  num_decodes=REQUESTS, backend=self.backend)

    def time_paged_decode(self, *params: Any) -> None:
        self.call()
        self.sync()


class PagedGraphStep(Timed):
    params = (CONFIGS, CONTEXTS)
    param_names = ("config", "context")

    def setup(self, config: str, context: int) -> None:
        try:
            import torch
            from turboquant_torch import write_beside
        except ImportError as e:
            raise NotImplementedError("torch is not installed") from e
        if not torch.cuda.is_available():
            raise NotImplementedError("torch sees no CUDA device")
        base = PagedDecode()
        base.setup("cupy_raw", config, context)
        t = torch.from_dlpack  # zero-copy views of the CuPy arrays
        cache = base.cache.converted(t)
        q, key, value, table, seq_lens, qsl = (t(a) for a in base.args)
        out, slots = t(base.out), torch.as_tensor(base.new_slots, device=q.device)

        def write() -> None:
            tq.paged_write(cache, key, value, slots, backend="cupy_raw")

        def attend() -> None:
            tq.paged_attention(cache, q, key, value, table, seq_lens, qsl, scale=base.scale, out=out,
                               num_decodes=REQUESTS, backend="cupy_raw")

        def step() -> None:
            for _ in range(LAYERS):
                write_beside(write, attend, q.device)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: kernels, plans, replays built
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()
        self.sync = torch.cuda.synchronize
        self.graph.replay()
        self.sync()

    def time_graph_step(self, *params: Any) -> None:
        self.graph.replay()
        self.sync()
