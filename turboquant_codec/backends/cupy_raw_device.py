"""The device side of cupy_raw: whether it can run here, CuPy itself (imported on first use, so
importing the backend never imports cupy), and the device attributes the planners read (SM count,
opt-in shared memory, compute capability), each asked once per device.

Shared memory per block: kernels are planned within ``occupancy.SM90_SMEM_OPTIN``, the most a block
may opt into on sm_90 (H100/H200); one above ``occupancy.STATIC_SMEM_LIMIT`` opts in
(``max_dynamic_shared_size_bytes``) once per build.
"""

from __future__ import annotations

import functools
from typing import Any

from .._ops import Availability


def availability() -> Availability:
    """Whether CuPy, a CUDA device and NVRTC are usable here; the reason when not."""
    try:
        import cupy
    except ImportError:
        return Availability(False, "cupy not installed")
    except Exception as exc:  # a broken install is a reason, not a crash
        return Availability(False, f"cupy failed to import: {type(exc).__name__}: {exc}")
    try:
        if not cupy.cuda.is_available():
            try:
                cupy.cuda.runtime.getDeviceCount()
                detail = "cupy.cuda.is_available() is False"
            except Exception as exc:
                detail = f"{type(exc).__name__}: {exc}"
            return Availability(False, f"no CUDA device: {detail}")
    except Exception as exc:
        return Availability(False, f"no CUDA device: {type(exc).__name__}: {exc}")
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:
        return Availability(False, f"NVRTC missing: {type(exc).__name__}: {exc}")
    return Availability(True)


def cupy() -> Any:
    import cupy

    return cupy


@functools.cache
def sm_count(device: int) -> int:
    cp = cupy()
    return int(cp.cuda.Device(device).attributes["MultiProcessorCount"])


@functools.cache
def smem_optin(device: int) -> int:
    return int(cupy().cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"])


@functools.cache
def sm90(device: int) -> bool:
    """Whether ``device`` has compute capability 9.0 (asked once: every codec op consults it)."""
    return bool(cupy().cuda.Device(device).compute_capability == "90")
