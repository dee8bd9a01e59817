"""Kernel launches packed once, replayed by address: what cupy_raw's decode paths keep between calls.

A ``Launch`` holds one kernel's grid, block, dynamic shared memory and its arguments as the
driver's parameter array (one C value per argument: device addresses as ``uint64``, scalars as
``int32`` / ``int64`` / ``float32``), so repeating it is one ``cuLaunchKernel``; CuPy's own launcher
converts every argument on every call (tens of microseconds for a kernel of 24 arguments). A launch
holds no array: the memory its addresses name must outlive every replay (the caller's keys pin
the layout at each address; scratch buffers are never freed, see ``cupy_paged._scratch``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_CTYPES: dict[np.dtype, Any] = {np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.int64): ctypes.c_int64,
                                np.dtype(np.int32): ctypes.c_int32, np.dtype(np.float32): ctypes.c_float}


def _cupy() -> Any:
    import cupy

    return cupy


class Launch:
    """One kernel launch with its arguments packed once.

    Parameters
    ----------
    fn : cupy.cuda.function.Function
        The kernel, of the device the launch is for.
    grid, block : tuple of int (1 to 3 entries)
    args : tuple of NumPy scalars (uint64 addresses, int32, int64, float32), in the kernel's order
    smem : int
        Dynamic shared memory in bytes.
    """

    def __init__(self, fn: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...],
                 smem: int) -> None:
        self.fn, self.grid, self.block, self.args, self.smem = fn, grid, block, args, smem
        self.values = [_CTYPES[np.asarray(a).dtype](a.item()) for a in args]
        self.params = (ctypes.c_void_p * len(self.values))(*(ctypes.addressof(v) for v in self.values))
        g, bl = (*grid, 1, 1), (*block, 1, 1)
        self.dims = (int(g[0]), int(g[1]), int(g[2]), int(bl[0]), int(bl[1]), int(bl[2]), int(smem))

    def __call__(self, stream: int) -> None:
        launch = getattr(_cupy().cuda.driver, "launchKernel", None)
        if launch is None:  # a CuPy without the driver binding: its own launcher
            self.fn(self.grid, self.block, self.args, self.smem)
            return
        launch(self.fn.ptr, *self.dims, stream, ctypes.addressof(self.params), 0)


def on_device(device: int, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` with ``device`` current, entering its context only when another device is (a
    replay's common case costs one runtime query)."""
    cp = _cupy()
    if cp.cuda.runtime.getDevice() == device:
        fn(*args)
        return
    with cp.cuda.Device(device):
        fn(*args)


def run_in_order(launches: Sequence[Launch], device: int) -> None:
    """``launches`` one after another on ``device``'s current stream (``cupy_raw._stream``);
    ``device`` must be current (``on_device``)."""
    from .cupy_raw import _stream

    stream = _stream(device).ptr
    for launch in launches:
        launch(stream)
