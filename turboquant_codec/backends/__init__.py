"""The lazy, string-addressed backend registry.

A backend is a module implementing the op contract (``turboquant_codec._ops``), or the subset of it
that its rows of ``capabilities.CAPABILITIES`` declare. Nothing here imports a backend module until
it is asked for by name, so ``import turboquant_codec`` never imports numba or cupy. Availability is
checked on demand and comes with a reason.

The package itself is callable: ``turboquant_codec.backends()`` returns ``statuses()``.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from dataclasses import dataclass
from types import ModuleType

from .. import tuning
from .._ops import Availability

# name -> (module, where its inputs live)
REGISTRY: dict[str, tuple[str, str]] = {
    "numpy": ("turboquant_codec.backends.numpy_ref", "cpu"),
    "numba_cuda": ("turboquant_codec.backends.numba_cuda", "cuda"),
    "cupy_raw": ("turboquant_codec.backends.cupy_raw", "cuda"),
    "numba_cpu": ("turboquant_codec.backends.numba_cpu", "cpu"),
}
# "auto" takes the first of these, for where the data lives, that serves the request and is
# available: compiled kernels before the references.
PREFERENCE = {"cpu": ("numba_cpu", "numpy"), "cuda": ("cupy_raw", "numba_cuda")}
ENV_VAR = tuning.BACKEND_VAR


@dataclass(frozen=True)
class BackendStatus:
    """One row of ``turboquant_codec.backends()``."""

    name: str
    device: str
    available: bool
    reason: str


def _check_name(name: str) -> None:
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(['auto', *REGISTRY])}")


@functools.cache
def availability(name: str) -> Availability:
    """Whether backend ``name`` can run here; the reason when it cannot (cached per process)."""
    _check_name(name)
    try:
        module = importlib.import_module(REGISTRY[name][0])
    except Exception as exc:  # any import failure is a reason to report, not a crash
        return Availability(False, f"failed to import: {type(exc).__name__}: {exc}")
    result: Availability = module.availability()
    return result


def load(name: str) -> ModuleType:
    """The module of an available backend; ValueError for unknown names, RuntimeError with the reason."""
    status = availability(name)
    if not status:
        raise RuntimeError(f"backend {name!r} is not available: {status.reason}")
    return importlib.import_module(REGISTRY[name][0])


def requested(name: str) -> str | None:
    """The backend named by ``name`` or, for ``"auto"``, by ``TQ_BACKEND``; None leaves it to ``auto``."""
    if name == "auto":
        name = tuning.requested_backend()
    if name == "auto":
        return None
    _check_name(name)
    return name


def statuses() -> list[BackendStatus]:
    """Every registered backend with its availability and the reason when absent."""
    rows = []
    for name, (_, device) in REGISTRY.items():
        status = availability(name)
        rows.append(BackendStatus(name, device, status.ok, status.reason))
    return rows


class _CallableModule(types.ModuleType):
    def __call__(self) -> list[BackendStatus]:
        """Every registered backend with its device, availability and the reason when unavailable.

        ``TQ_BACKEND`` overrides ``backend="auto"`` everywhere.
        """
        return statuses()


sys.modules[__name__].__class__ = _CallableModule
