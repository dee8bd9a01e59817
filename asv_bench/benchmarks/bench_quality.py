"""Quality as tracked numbers, so a quality regression shows in the history like a slowdown.

All data is seeded: the same commit gives the same numbers on every run (up to float rounding on
codebook boundaries between backends).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import turboquant_codec as tq

from .common import (
    BACKENDS,
    CONFIGS,
    HEAD_DIMS,
    KV_HEADS,
    Q_HEADS,
    kv_like,
    parse_config,
    put,
    require,
    scaled,
    to_numpy,
    unit_vectors,
)

QUALITY_VECTORS = scaled(4096)  # seeded unit vectors per configuration
ATTENTION_TOKENS = scaled(512)


class Quality:
    params = (BACKENDS, HEAD_DIMS, CONFIGS)
    param_names = ("backend", "head_dim", "config")
    timeout = 300

    def setup(self, backend: str, head_dim: int, config: str) -> None:
        for op in ("encode", "decode", "scores", "attention"):
            require(op, backend, head_dim, config)
        self.backend = backend
        self.mode, self.bits = parse_config(config)

    def _encode(self, x: Any) -> tq.Encoded:
        return tq.encode(
            put(self.backend, x), bits=self.bits, mode=self.mode, seed=7, backend=self.backend
        )

    def track_mse(self, backend: str, head_dim: int, config: str) -> float:
        """E|x - x_hat|^2 over seeded unit vectors (the paper's D_mse)."""
        x = unit_vectors(np.random.default_rng(0), (QUALITY_VECTORS, head_dim)).astype(np.float32)
        x_hat = to_numpy(tq.decode(self._encode(x), backend=backend)).astype(np.float64)
        return float(np.mean(np.sum((x_hat - x) ** 2, axis=-1)))

    track_mse.unit = "MSE"  # type: ignore[attr-defined]

    def track_inner_product_error(self, backend: str, head_dim: int, config: str) -> float:
        """Mean squared error of estimated <q, k> over seeded unit queries and keys (scores op)."""
        rng = np.random.default_rng(1)
        k = unit_vectors(rng, (QUALITY_VECTORS, head_dim)).astype(np.float32)
        q = unit_vectors(rng, (16, head_dim)).astype(np.float32)
        est = to_numpy(tq.scores(put(backend, q), self._encode(k), backend=backend))
        exact = q.astype(np.float64) @ k.astype(np.float64).T
        return float(np.mean((est - exact) ** 2))

    track_inner_product_error.unit = "MSE"  # type: ignore[attr-defined]

    def track_attention_rel_error(self, backend: str, head_dim: int, config: str) -> float:
        """|out - exact| / |exact| of decode attention over KV-like (outlier-channel) keys/values."""
        rng = np.random.default_rng(2)
        k = kv_like(rng, (KV_HEADS, ATTENTION_TOKENS, head_dim))
        v = kv_like(rng, (KV_HEADS, ATTENTION_TOKENS, head_dim))
        q = kv_like(rng, (Q_HEADS, head_dim))
        scale = head_dim**-0.5
        out = to_numpy(
            tq.attention(
                put(backend, q.astype(np.float32)),
                self._encode(k.astype(np.float32)),
                self._encode(v.astype(np.float32)),
                scale=scale,
                backend=backend,
            )
        ).astype(np.float64)
        group = Q_HEADS // KV_HEADS
        kh = np.repeat(k, group, axis=0)
        vh = np.repeat(v, group, axis=0)
        logits = np.einsum("hd,hnd->hn", q, kh) * scale
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        exact = np.einsum("hn,hnd->hd", p, vh)
        return float(np.linalg.norm(out - exact) / np.linalg.norm(exact))

    track_attention_rel_error.unit = "relative L2"  # type: ignore[attr-defined]


class Size:
    """Honest storage cost (codes, QJL signs and norms) of one vector, from ``Encoded``."""

    params = (HEAD_DIMS, CONFIGS)
    param_names = ("head_dim", "config")

    def setup(self, head_dim: int, config: str) -> None:
        require("encode", "numpy", head_dim, config)

    def track_bits_per_value(self, head_dim: int, config: str) -> float:
        mode, bits = parse_config(config)
        # 4096 tokens per stream: the per-stream channel permutation is amortised as in a real cache.
        x = unit_vectors(np.random.default_rng(0), (1, 4096, head_dim)).astype(np.float32)
        return float(tq.encode(x, bits=bits, mode=mode).bits_per_value)

    track_bits_per_value.unit = "bits/value"  # type: ignore[attr-defined]
