"""turboquant_vllm: a vLLM attention backend with a TurboQuant-compressed paged KV cache.

Installed entry points (pyproject.toml):

- ``vllm.general_plugins`` -> ``register``: in every vLLM process, checks the vLLM version and registers
  ``TQCodecAttentionBackend`` in vLLM's ``CUSTOM`` backend slot (``--attention-backend CUSTOM``).
- ``vllm.platform_plugins`` -> ``turboquant_vllm.platform:detect``: on CPU hosts, a ``CpuPlatform`` subclass
  that honours ``--attention-backend CUSTOM`` (the stock CPU platform ignores it) and reserves the raw
  side pool out of the KV-cache budget.

Upstream vLLM owns the backend name ``TURBOQUANT`` and the ``turboquant_*`` cache dtypes for its own,
different recipe; this backend is ``CUSTOM`` to vLLM and calls itself ``TQ_CODEC``.

Python API of the original plugin: ``TurboQuantConfig`` and ``TurboQuantAttentionImpl`` (usable without
an engine: ``impl.forward(query, key, value)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version_gate import SUPPORTED_VLLM, check_vllm_version, vllm_version
from .config import DEFAULTS, ConfigError, TurboQuantConfig

if TYPE_CHECKING:
    from .backend import TQCodecAttentionBackend, TurboQuantAttentionImpl

BACKEND_NAME = "TQ_CODEC"
BACKEND_QUALNAME = "turboquant_vllm.backend.TQCodecAttentionBackend"

__all__ = [
    "BACKEND_NAME",
    "DEFAULTS",
    "SUPPORTED_VLLM",
    "ConfigError",
    "TQCodecAttentionBackend",
    "TurboQuantAttentionImpl",
    "TurboQuantConfig",
    "check_vllm_version",
    "register",
    "vllm_version",
]


def __getattr__(name: str) -> Any:
    # The backend module imports torch (and vLLM when present): load it on first use only.
    if name in ("TurboQuantAttentionImpl", "TQCodecAttentionBackend"):
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'turboquant_vllm' has no attribute {name!r}")


def register() -> None:
    """``vllm.general_plugins`` entry point: version gate, then the CUSTOM slot (idempotent)."""
    check_vllm_version(vllm_version())
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    slot = AttentionBackendEnum.CUSTOM
    if slot.is_overridden():
        current = slot.get_path()
        if current != BACKEND_QUALNAME:
            raise RuntimeError(
                f"turboquant_vllm: vLLM's CUSTOM attention backend slot already holds {current}; "
                "only one CUSTOM backend can be installed (exclude one plugin with VLLM_PLUGINS)"
            )
        return
    register_backend(slot, BACKEND_QUALNAME)
    from .evidence import mark

    mark("register")
