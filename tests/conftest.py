"""Shared fixtures: a ``backend`` fixture over every registered backend, and seeded data makers.

Each backend is compared with the NumPy reference. A backend that is not available here is skipped
with its availability reason, so the same suite runs on a laptop, in CI (Numba's CUDA simulator)
and on a GPU machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from turboquant_codec import _interop
from turboquant_codec import backends as registry
from turboquant_codec.testing import kv_like, unit_vectors  # noqa: F401  (re-exported for the tests)


def _put_numpy(x: np.ndarray) -> Any:
    return x


def _put_cuda(x: np.ndarray) -> Any:
    """Device copy: CuPy when it can reach a GPU, else a Numba device array (simulator included)."""
    try:
        import cupy

        if cupy.cuda.is_available():
            return cupy.asarray(x)
    except ImportError:
        pass
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(x))


@dataclass(frozen=True)
class BackendUnderTest:
    """A backend name plus how to put host data where that backend reads it."""

    name: str
    put: Callable[[np.ndarray], Any]
    # Numba's CUDA simulator runs ~2.5 ms per thread: keep its grids to a few blocks.
    simulated: bool = False

    def get(self, x: Any) -> np.ndarray:
        return _interop.to_numpy(x)


def _params() -> list[Any]:
    out = []
    for name, (_, device) in registry.REGISTRY.items():
        out.append(pytest.param(name, id=name, marks=[] if device == "cpu" else [pytest.mark.gpu]))
    return out


@pytest.fixture(params=_params())
def backend(request: pytest.FixtureRequest) -> BackendUnderTest:
    name = request.param
    status = registry.availability(name)
    if not status:
        pytest.skip(f"backend {name} unavailable: {status.reason}")
    device = registry.REGISTRY[name][1]
    if device == "cpu":
        return BackendUnderTest(name, _put_numpy)
    return BackendUnderTest(name, _put_cuda, os.environ.get("NUMBA_ENABLE_CUDASIM") == "1")
