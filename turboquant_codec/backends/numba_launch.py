"""Numba kernel launches with the arguments packed here, and the light device arrays they take.

Why: Numba's launch path types every argument, checks the CUDA context several times per array and
marshals arrays through Python objects. With this backend's 10-30 arguments per kernel that host
time exceeds a decode step's GPU work (numba-cuda issue #477; figures in
``docs/design-measurements.md``). Here a kernel is compiled once per (device, argument types)
through its Numba dispatcher; each call then packs its arguments directly and launches with
``cuda.core.launch``, the call Numba itself ends in.

Layout owned here
-----------------
A ``DeviceView`` is a C-contiguous GPU array: data pointer, shape, dtype and the object keeping the
memory alive. As a kernel argument it is Numba's array data model flattened, in the order of
``ARRAY_MEMBERS``: meminfo (0), parent (0), item count, item size, data pointer, then the shape and
the byte strides (``ArrayModel`` in numba.cuda's data models; ``test_numba_launch`` checks the
order). Scalars are packed as Numba's ``_Kernel._prepare_args`` packs them (ctypes integers and
floats, plain bools).

Streams: every launch, allocation and read-back goes to the caller's current stream
(``_interop.current_stream``: CuPy's or torch's, as cupy_raw follows them), so work queued before
a call on that stream is seen, and the calls capture into either library's CUDA graph. Outputs come
from cuda.core's stream-ordered memory pool (``empty``), ordered on that stream: no device-wide
synchronisation when they are freed, unlike ``cuMemFree`` behind Numba's own device arrays.

Under Numba's CUDA simulator ``launch`` is the ordinary ``kernel[grid, block, stream, smem](*args)``.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from cuda.bindings import driver as _cu
from cuda.core import Device, LaunchConfig, Stream
from cuda.core import launch as core_launch
from numba import config as _nb_config
from numba import cuda, from_dtype
from numba.cuda import types as _nb_types
from numba.cuda.typing.typeof import Purpose, typeof

from .. import _interop

# numba.cuda re-exports numba.core's types under a module mypy cannot see into.
types: Any = _nb_types
# Numba's array data model members, in the order a kernel receives them.
ARRAY_MEMBERS = ("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides")
# bfloat16 has no NumPy dtype: its CUDA-array-interface typestrs, read as their uint16 bits.
BF16_TYPESTRS = ("<V2", "|V2")


def simulated() -> bool:
    """Whether Numba runs kernels in its CUDA simulator (NUMBA_ENABLE_CUDASIM=1 at import)."""
    return bool(getattr(_nb_config, "ENABLE_CUDASIM", False))


class DeviceView:
    """A C-contiguous array in GPU memory, as far as a kernel launch needs it.

    Parameters
    ----------
    ptr : int
        Device address of element 0.
    shape : tuple of int
    dtype : numpy dtype
    owner : object
        Kept referenced while the view lives (the array or buffer owning the memory).
    """

    __slots__ = ("ptr", "shape", "dtype", "owner", "params")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: Any, owner: Any) -> None:
        self.ptr, self.shape, self.dtype, self.owner = ptr, tuple(shape), np.dtype(dtype), owner
        item = self.dtype.itemsize
        strides = []
        step = item
        for extent in reversed(self.shape):
            strides.append(step)
            step *= extent
        self.params = (0, 0, step // item, item, ptr, *self.shape, *reversed(strides))

    @classmethod
    def of(cls, x: Any, iface: dict[str, Any] | None = None) -> DeviceView:
        """A view of any C-contiguous GPU array (``__cuda_array_interface__``, or ``iface`` when the
        caller has read it already); bfloat16 as uint16."""
        if isinstance(x, DeviceView):
            return x
        if iface is None:
            iface = x.__cuda_array_interface__
        typestr = "<u2" if iface["typestr"] in BF16_TYPESTRS else iface["typestr"]
        shape, dtype = tuple(iface["shape"]), np.dtype(typestr)
        view = cls(iface["data"][0], shape, dtype, x)
        strides = iface.get("strides")
        if strides is not None and any(
            extent > 1 and stride != want
            for extent, stride, want in zip(shape, strides, view.params[5 + len(shape):], strict=True)
        ):
            raise ValueError(f"numba_cuda needs C-contiguous arrays, got strides {tuple(strides)} "
                             f"for shape {shape}; make a contiguous copy first")
        return view

    @property
    def size(self) -> int:
        return int(self.params[2])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_c_contiguous(self) -> bool:
        return True

    def reshape(self, *shape: int) -> DeviceView:
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return DeviceView(self.ptr, shape, self.dtype, self.owner)

    def view(self, dtype: Any) -> DeviceView:
        """The same bytes as ``dtype`` along the last axis (as ``numpy.ndarray.view``)."""
        dtype = np.dtype(dtype)
        last = self.shape[-1] * self.dtype.itemsize
        if last % dtype.itemsize:
            raise ValueError(f"last axis of {last} bytes does not divide into {dtype}")
        return DeviceView(self.ptr, (*self.shape[:-1], last // dtype.itemsize), dtype, self.owner)

    def copy_to_host(self) -> np.ndarray:
        """The contents, read after the work queued on the caller's current stream."""
        return to_host(self, device_of(self.ptr) or 0)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "strides": None, "version": 3}


def device_of(ptr: int) -> int | None:
    """Ordinal of the GPU holding device address ``ptr`` (None for a null pointer, as empty arrays
    may have)."""
    if not ptr:
        return None
    err, ordinal = _cu.cuPointerGetAttribute(_cu.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                             ptr)
    if err != _cu.CUresult.CUDA_SUCCESS:
        raise ValueError(f"cannot tell which GPU holds address {ptr:#x}: {err.name}")
    return int(ordinal)


def empty(shape: tuple[int, ...], dtype: Any, device: int) -> DeviceView:
    """Uninitialised GPU memory on ``device`` (the current one) from cuda.core's stream-ordered pool,
    ordered on the caller's current stream."""
    nbytes = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
    buf = _device(device).allocate(nbytes, stream=_core_stream(device))
    return DeviceView(int(buf.handle), shape, dtype, buf)


def to_host(x: Any, device: int) -> np.ndarray:
    """A host copy of GPU array ``x`` (a ``DeviceView`` or a Numba device array) on ``device``, read
    on the caller's current stream once the work queued there before it has run."""
    stream = numba_stream(device)
    array = cuda.as_cuda_array(x) if isinstance(x, DeviceView) else x
    host = array.copy_to_host(stream=stream)
    stream.synchronize()
    return np.asarray(host)


_DEVICES: dict[int, Any] = {}


def _device(ordinal: int) -> Any:
    dev = _DEVICES.get(ordinal)
    if dev is None:
        dev = Device(ordinal)
        dev.set_current()  # cuda.core needs it once; it is the primary context Numba also uses
        _DEVICES[ordinal] = dev
    return dev


# Wrappers of the caller's streams, per (device, handle) for cuda.core and per handle for Numba: a
# handle only (no ownership), so keeping one for a recycled handle is safe. Bounded: cleared when full.
_STREAMS: dict[tuple[int, int], Any] = {}
_NUMBA_STREAMS: dict[int, Any] = {}
_MAX_STREAMS = 64


def _core_stream(device: int) -> Any:
    """The caller's current stream on ``device`` (the current device) as a cuda.core ``Stream``."""
    key = (device, _interop.current_stream(device))
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) >= _MAX_STREAMS:
            _STREAMS.clear()
        stream = _STREAMS[key] = Stream.from_handle(key[1])
    return stream


def numba_stream(device: int) -> Any:
    """The caller's current stream on ``device`` as a Numba stream, for Numba's own launches and
    copies (the default stream where the caller has none: handle 0)."""
    handle = _interop.current_stream(device)
    stream = _NUMBA_STREAMS.get(handle)
    if stream is None:
        if len(_NUMBA_STREAMS) >= _MAX_STREAMS:
            _NUMBA_STREAMS.clear()
        stream = cuda.default_stream() if handle == 0 else cuda.external_stream(handle)
        _NUMBA_STREAMS[handle] = stream
    return stream


def _packer(ty: Any) -> Callable[[list[Any], Any], None]:
    """How one argument of Numba type ``ty`` becomes kernel parameters."""
    if isinstance(ty, types.Array):
        return lambda out, a: out.extend(a.params)
    if isinstance(ty, types.Boolean):
        return lambda out, a: out.append(bool(a))
    if isinstance(ty, types.Integer):
        ctype = getattr(ctypes, f"c_{ty}")
        return lambda out, a: out.append(ctype(a))
    if ty == types.float32:
        return lambda out, a: out.append(ctypes.c_float(a))
    if ty == types.float64:
        return lambda out, a: out.append(ctypes.c_double(a))
    raise TypeError(f"no kernel-argument packing for Numba type {ty}")


def _arg_type(a: Any) -> Any:
    if isinstance(a, DeviceView):
        return types.Array(from_dtype(a.dtype), a.ndim, "C")
    return typeof(a, Purpose.argument)


# (kernel, device, argument signature) -> (registers per thread, launchable handle, packers)
_COMPILED: dict[tuple[Any, ...], tuple[int, Any, list[Callable[[list[Any], Any], None]]]] = {}


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((a.dtype.char, len(a.shape)) if isinstance(a, DeviceView) else type(a) for a in args)


def _views(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(DeviceView.of(a) if not isinstance(a, DeviceView) and hasattr(a, "__cuda_array_interface__")
                 else a for a in args)


def _compiled(kernel: Any, device: int, args: tuple[Any, ...]) -> tuple[int, Any, list[Any]]:
    """(registers per thread, launchable handle, argument packers) for ``args``' types, built once."""
    key = (kernel, device, _signature(args))
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel.compile(tuple(_arg_type(a) for a in args))
        handle = compiled._codelibrary.get_cufunc().kernel
        entry = (int(compiled.regs_per_thread), handle, [_packer(t) for t in compiled.argument_types])
        _COMPILED[key] = entry
    return entry


def registers(kernel: Any, device: int, *args: Any) -> int | None:
    """Registers per thread of ``kernel`` compiled for ``args``' types (None under the simulator)."""
    if simulated():
        return None
    return _compiled(kernel, device, _views(args))[0]


def launch(kernel: Any, device: int, grid: Any, block: int, smem_bytes: int, *args: Any) -> None:
    """Launch Numba ``kernel`` on GPU ``device`` (the current one) on the caller's current stream.

    Parameters
    ----------
    kernel : Numba CUDA dispatcher
    device : int
        Ordinal of the current GPU: kernels are loaded per device.
    grid, block : launch shape (``block`` threads in x)
    smem_bytes : int
        Dynamic shared memory.
    *args
        ``DeviceView`` arrays (any other GPU array is viewed with ``DeviceView.of``), Python ints
        and bools, NumPy float32 scalars; simulator arrays under the simulator.
    """
    if simulated():
        kernel[grid, block, numba_stream(device), smem_bytes](*args)
        return
    args = _views(args)
    _, handle, packers = _compiled(kernel, device, args)
    params: list[Any] = []
    for pack, a in zip(packers, args, strict=True):
        pack(params, a)
    core_launch(_core_stream(device), LaunchConfig(grid=grid, block=block, shmem_size=smem_bytes), handle,
                *params)
