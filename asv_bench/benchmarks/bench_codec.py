"""Time and peak memory of encode, decode, scores and attention, per backend, head dimension,
bits/mode and size (tokens per KV head, 8 KV heads).

Inputs are built and every op is run once in ``setup`` (codebooks, rotations, compiled kernels and
cached launch plans are warm before timing). GPU timings wait for the device inside the timed
function. ``peakmem_*`` is the process's peak host RSS (meaningful for the CPU reference);
``DeviceMemory.track_peak_bytes`` is the peak of CuPy's memory pool during one call (backends that
allocate through CuPy; others are skipped).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import turboquant_codec as tq

from .common import (
    BACKENDS,
    CONFIGS,
    DTYPE,
    HEAD_DIMS,
    KV_HEADS,
    Q_HEADS,
    SCORE_QUERIES,
    TAIL,
    TOKENS,
    DevicePeak,
    Timed,
    kv_like,
    parse_config,
    put,
    require,
    scaled,
    synchronizer,
)


class _Op(Timed):
    op = ""
    params = (BACKENDS, HEAD_DIMS, CONFIGS, TOKENS)
    param_names = ("backend", "head_dim", "config", "tokens")

    def setup(self, backend: str, head_dim: int, config: str, tokens: int) -> None:
        for op in ("encode", self.op):
            require(op, backend, head_dim, config, tokens)
        self.backend = backend
        self.mode, self.bits = parse_config(config)
        self.sync = synchronizer(backend)
        rng = np.random.default_rng(1234)
        tokens = scaled(tokens)
        self.x = put(backend, kv_like(rng, (KV_HEADS, tokens, head_dim)).astype(DTYPE))
        self.prepare(rng, head_dim, tokens)
        self.call()  # warm-up: tables, kernels, plans
        self.sync()

    def prepare(self, rng: np.random.Generator, head_dim: int, tokens: int) -> None:
        pass

    def encode(self, x: Any) -> tq.Encoded:
        return tq.encode(x, bits=self.bits, mode=self.mode, backend=self.backend, check_finite=False)

    def call(self) -> Any:
        raise NotImplementedError

    def run(self, *params: Any) -> None:
        self.call()
        self.sync()


class Encode(_Op):
    op = "encode"

    def call(self) -> Any:
        return self.encode(self.x)

    def time_encode(self, *params: Any) -> None:
        self.run()

    def peakmem_encode(self, *params: Any) -> None:
        self.run()


class Decode(_Op):
    op = "decode"

    def prepare(self, rng: np.random.Generator, head_dim: int, tokens: int) -> None:
        self.enc = self.encode(self.x)

    def call(self) -> Any:
        return tq.decode(self.enc, backend=self.backend)

    def time_decode(self, *params: Any) -> None:
        self.run()

    def peakmem_decode(self, *params: Any) -> None:
        self.run()


class Scores(_Op):
    op = "scores"

    def prepare(self, rng: np.random.Generator, head_dim: int, tokens: int) -> None:
        self.enc = self.encode(self.x)
        q = rng.standard_normal((KV_HEADS, SCORE_QUERIES, head_dim)).astype(DTYPE)
        self.q = put(self.backend, q)

    def call(self) -> Any:
        return tq.scores(self.q, self.enc, backend=self.backend)

    def time_scores(self, *params: Any) -> None:
        self.run()

    def peakmem_scores(self, *params: Any) -> None:
        self.run()


class Attention(_Op):
    """Decode attention: 32 query heads over 8 KV heads of compressed K and V plus a raw tail."""

    op = "attention"

    def prepare(self, rng: np.random.Generator, head_dim: int, tokens: int) -> None:
        self.k = self.encode(self.x)
        v = kv_like(rng, (KV_HEADS, tokens, head_dim)).astype(DTYPE)
        self.v = self.encode(put(self.backend, v))
        q = rng.standard_normal((Q_HEADS, head_dim)).astype(DTYPE)
        self.q = put(self.backend, q)
        tail = rng.standard_normal((2, KV_HEADS, TAIL, head_dim)).astype(DTYPE)
        self.k_tail, self.v_tail = put(self.backend, tail[0]), put(self.backend, tail[1])
        self.scale = head_dim**-0.5

    def call(self) -> Any:
        return tq.attention(
            self.q, self.k, self.v, scale=self.scale, k_tail=self.k_tail, v_tail=self.v_tail,
            backend=self.backend,
        )

    def time_attention(self, *params: Any) -> None:
        self.run()

    def peakmem_attention(self, *params: Any) -> None:
        self.run()


class DeviceMemory:
    """Peak bytes CuPy's pool holds during one call of each op (cupy_raw; others are skipped)."""

    params = (("encode", "decode", "scores", "attention"), *_Op.params)
    param_names = ("op", *_Op.param_names)
    timeout = 300

    def setup(self, op: str, backend: str, *params: Any) -> None:
        if backend != "cupy_raw":
            raise NotImplementedError("device peak is read from CuPy's memory pool (cupy_raw only)")
        self.bench = {"encode": Encode, "decode": Decode, "scores": Scores, "attention": Attention}[op]()
        self.bench.setup(backend, *params)

    def track_peak_bytes(self, *params: Any) -> int:
        peak = DevicePeak()
        self.bench.sync()
        with peak.hook:
            self.bench.call()
            self.bench.sync()
        return peak.peak

    track_peak_bytes.unit = "bytes"  # type: ignore[attr-defined]
