"""The op contract, declared once: every backend module implements these functions.

Backends receive arrays already converted by their own ``asarray`` and validated by the public API
(shapes, dtypes, finiteness, configuration); they return arrays of their own library. Every op is
defined by the NumPy reference backend (``backends/numpy_ref.py``).

=========  ==========================================================  ===============================
op         arguments                                                   returns
=========  ==========================================================  ===============================
encode     x (*lead, n, d) float16/bfloat16/float32, cfg, channels     (records, channels)
           ((*lead, d) uint16 or None: choose the outlier channels)
decode     enc: Encoded                                                (*lead, n, d) float32
scores     q (*lead, m, d), keys: Encoded (*lead, n, d)                (*lead, m, n) float32
attention  q (*lead, h_q, d), k, v: Encoded (*lead, h_kv, n, d),       (*lead, h_q, d) float32
           scale, k_tail/v_tail (*lead, h_kv, t, d) or None
=========  ==========================================================  ===============================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .config import CodecConfig
from .encoded import Encoded

OPS = ("encode", "decode", "scores", "attention")


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class Backend(Protocol):
    """What a backend module provides (module-level functions)."""

    def availability(self) -> Availability: ...

    def asarray(self, x: Any) -> Any: ...

    def encode(self, x: Any, cfg: CodecConfig, channels: Any) -> tuple[Any, Any]: ...

    def decode(self, enc: Encoded) -> Any: ...

    def scores(self, q: Any, keys: Encoded) -> Any: ...

    def attention(
        self, q: Any, k: Encoded, v: Encoded, scale: float, k_tail: Any, v_tail: Any
    ) -> Any: ...
