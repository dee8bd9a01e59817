"""Choosing the backend for one request: by requirements (the capability table), then speed.

An explicit name (argument or ``TQ_BACKEND``) must serve the request, else ValueError with the
table's reason (RuntimeError when it is not available here). ``"auto"`` walks the registry's
preference for where the data lives and takes the first backend whose table row serves the
request and that is available; when none does, the error lists every backend's reason. The table
is read before availability, so a backend that cannot serve an op is never imported for it.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, cast

from . import _interop
from . import backends as _registry
from ._ops import Backend
from .capabilities import CAPABILITIES
from .config import CodecConfig


def _refusal(op: str, name: str, configs: tuple[CodecConfig, ...], dtype: str | None) -> str | None:
    support = CAPABILITIES[op].get(name)
    if support is None:
        return f"does not implement {op}"
    for cfg in configs:
        refusal = support.refusal(dtype, cfg.d, cfg.bits, cfg.mode)
        if refusal:
            return f"does not support {refusal} for {op}"
    return None


def backend(op: str, name: str, ref: Any, configs: tuple[CodecConfig, ...], dtype: str | None) -> Backend:
    """The backend module that runs ``op`` on data like ``ref`` with these configurations, typed as the
    op contract (``_ops.Backend``: callers are checked against it; tests/test_ops_contract.py checks
    each module's functions against it for the ops its capability rows declare).

    Parameters
    ----------
    op : str
        One of ``_ops.OPS``.
    name : str
        ``"auto"`` or a registered backend name.
    ref : array
        Where the data lives (host or GPU).
    configs : tuple of CodecConfig
    dtype : str or None
        The float input's dtype name, when the op has one.
    """
    where = "cuda" if _interop.on_gpu(ref) else "cpu"
    return cast(Backend, _choose(op, _registry.requested(name), where, configs, dtype))


@functools.lru_cache(maxsize=256)
def _choose(op: str, explicit: str | None, where: str, configs: tuple[CodecConfig, ...],
            dtype: str | None) -> ModuleType:
    """``backend``'s choice, cached per request kind (errors are raised again, never cached)."""
    if explicit is not None:
        refusal = _refusal(op, explicit, configs, dtype)
        if refusal:
            raise ValueError(f"backend {explicit!r} {refusal}")
        return _registry.load(explicit)
    reasons = []
    for candidate in _registry.PREFERENCE[where]:
        refusal = _refusal(op, candidate, configs, dtype)
        if refusal is None:
            status = _registry.availability(candidate)
            if status:
                return _registry.load(candidate)
            refusal = f"not available: {status.reason}"
        reasons.append(f"{candidate}: {refusal}")
    place = "a GPU" if where == "cuda" else "the host"
    raise RuntimeError(f"no backend serves {op} for input on {place} ({'; '.join(reasons)})")
