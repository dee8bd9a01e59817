"""The public API on torch tensors, as a decode loop calls it: ``tq.attention`` with a bfloat16 torch
query and torch ``Encoded`` K and V (3.5 bits, mse), ``check_finite=False``, no tail, backend
"auto" (cupy_raw on CUDA tensors, the host backend on CPU tensors).

- ``time_attention_x10``: 10 back-to-back calls, then one synchronisation. On a GPU the host's
  time per call and the kernels overlap as in a decode loop; host time above the kernels' shows.
- ``track_host_us``: host microseconds per call with the GPU held busy by a sleep kernel queued
  ahead (CUDA only): the path's own cost, which issue 16 bounds at 30 us.

Shapes: batch x 8 KV heads x tokens, 32 query heads, d=128. The CPU runs the smallest size only.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import turboquant_codec as tq

from .common import KV_HEADS, Q_HEADS, Timed, scaled

HEAD_DIM = 128
BITS = 3.5
CPU_MAX = (1, 2048)  # (batch, tokens) the host backends run
# Sleep-kernel cycles queued ahead of a host-time sample (~25 ms): longer than 50 calls take.
HOLD_CYCLES = 50_000_000


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise NotImplementedError(f"torch not installed: {exc}") from exc
    return torch


def _kv(torch: Any, shape: tuple[int, ...], device: str, gen: Any) -> Any:
    """bfloat16 Gaussian keys/values drawn on ``device``, four channels 8x larger (as real keys have)."""
    x = torch.randn(shape, generator=gen, device=device)
    x[..., :4] *= 8.0
    return x.to(torch.bfloat16)


class _TorchAttention(Timed):
    params = (("cpu", "cuda"), (1, 8), (2048, 32768))
    param_names = ("device", "batch", "tokens")

    def setup(self, device: str, batch: int, tokens: int) -> None:
        torch = _torch()
        if device == "cuda" and not torch.cuda.is_available():
            raise NotImplementedError("torch has no CUDA device here")
        if device == "cpu" and (batch, tokens) > CPU_MAX:
            raise NotImplementedError(f"batch {batch} x {tokens} tokens: too large for the host backends")
        gen = torch.Generator(device=device).manual_seed(1234)
        shape = (batch, KV_HEADS, scaled(tokens), HEAD_DIM)
        self.k = tq.encode(_kv(torch, shape, device, gen), bits=BITS, seed=1, check_finite=False)
        self.v = tq.encode(_kv(torch, shape, device, gen), bits=BITS, seed=2, check_finite=False)
        self.q = torch.randn((batch, Q_HEADS, HEAD_DIM), generator=gen, device=device).to(torch.bfloat16)
        self.scale = HEAD_DIM**-0.5
        self.torch = torch
        self.cuda = device == "cuda"
        self.call()  # warm-up: kernels, tables, plans, native views
        self.sync()

    def call(self) -> Any:
        return tq.attention(self.q, self.k, self.v, scale=self.scale, check_finite=False)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


class TorchAttention(_TorchAttention):
    def time_attention_x10(self, *params: Any) -> None:
        for _ in range(10):
            self.call()
        self.sync()


class TorchAttentionHost(_TorchAttention):
    def setup(self, device: str, batch: int, tokens: int) -> None:
        if device != "cuda":
            raise NotImplementedError("host time with the GPU held busy: CUDA only")
        super().setup(device, batch, tokens)

    def track_host_us(self, *params: Any) -> float:
        samples = []
        for _ in range(5):
            self.torch.cuda._sleep(HOLD_CYCLES)
            t0 = time.perf_counter()
            for _ in range(50):
                self.call()
            samples.append((time.perf_counter() - t0) / 50 * 1e6)
            self.sync()
        return float(np.median(samples))

    track_host_us.unit = "us"  # type: ignore[attr-defined]
