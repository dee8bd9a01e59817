"""Which array library and device an input lives in, and handing results back to it.

Recognised without importing anything: NumPy arrays, torch tensors (CPU or CUDA), CuPy arrays and
Numba device arrays (anything with ``__cuda_array_interface__``). GPU results are handed back
zero-copy through DLPack or ``__cuda_array_interface__``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# Types of the two libraries recognised by module name, remembered per type: every public call asks
# several times per array, and ``type(x).__module__.split(".")`` is most of that cost.
_TYPE_LIBRARY: dict[type, str] = {}


def library_of(x: Any) -> str:
    """``"numpy"``, ``"torch"``, ``"cupy"`` or ``"numba"`` (any other CUDA array interface)."""
    cls = type(x)
    lib = _TYPE_LIBRARY.get(cls)
    if lib is not None:
        return lib
    module = cls.__module__.split(".")[0]
    if module in ("torch", "cupy"):
        _TYPE_LIBRARY[cls] = module
        return module
    # Other types are asked each time: an instance may carry its own ``__cuda_array_interface__``.
    if hasattr(x, "__cuda_array_interface__"):
        return "numba"
    return "numpy"


def on_gpu(x: Any) -> bool:
    """Whether ``x`` lives in GPU memory."""
    lib = library_of(x)
    if lib == "torch":
        return bool(x.is_cuda)
    return lib in ("cupy", "numba")


def is_fake(x: Any) -> bool:
    """Whether ``x`` is a torch tensor without data (meta, or a FakeTensor while tracing, wrapped
    or not)."""
    if library_of(x) != "torch":
        return False
    if x.is_meta or type(x).__name__ == "FakeTensor":
        return True
    from torch._subclasses.fake_tensor import is_fake as traced

    return bool(traced(x))


def current_stream(device: int) -> int:
    """Handle of the caller's current stream on GPU ``device``: the stream every GPU backend launches on.

    CuPy's current stream when CuPy is in use and it is not the default one, else torch's current
    stream when torch's CUDA is initialised, else 0 (the legacy default stream). Imports neither
    library: one not imported yet has no current stream to follow.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        handle = int(cupy.cuda.get_current_stream(device).ptr)
        if handle:
            return handle
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # initialised: available too
        return torch_stream(torch, device)
    return 0


def torch_stream(torch: Any, device: int) -> int:
    """Handle of torch's current stream on ``device``.

    ``torch.cuda.current_stream`` builds a ``torch.cuda.Stream`` object (a device guard and a
    Python constructor) on every call, several microseconds; torch's own generated code reads the
    raw handle through ``torch._C._cuda_getCurrentRawStream`` instead, used here where it exists.
    """
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device))
    return int(torch.cuda.current_stream(device).cuda_stream)


# Dtype objects (torch, NumPy) and their plain names; a handful per process.
_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(x: Any) -> str:
    """Dtype of ``x`` as a plain name (``"float16"``, ``"bfloat16"``, ...), whatever its library."""
    dtype = x.dtype
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype object
        name = str(dtype).removeprefix("torch.")
        if len(_DTYPE_NAMES) < 64 and str(type(dtype).__module__).split(".")[0] in ("torch", "numpy"):
            try:
                _DTYPE_NAMES[dtype] = name
            except TypeError:
                pass
        return name


def gpu_key(x: Any) -> tuple[Any, ...] | None:
    """What identifies a GPU torch tensor's or CuPy array's memory and layout: the one key of an
    array by identity that every memo of GPU calls uses (``_replay``, ``api._native``, cupy_paged's
    launches).

    Returns
    -------
    tuple or None
        (address, shape, strides, dtype, device) for a CUDA torch tensor or a CuPy array (strides
        as the library gives them: elements for torch, bytes for CuPy); ``()`` for None; None for
        anything else (host arrays, Numba device arrays). The device is in the key although device
        addresses are unique across devices (unified addressing): empty arrays all have address 0.
    """
    if x is None:
        return ()
    lib = library_of(x)
    if lib == "torch":
        return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.get_device()) if x.is_cuda else None
    if lib == "cupy":
        data = x.data
        return (data.ptr, x.shape, x.strides, x.dtype, data.device_id)
    return None


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy view or copy of ``x``; torch bfloat16 becomes ml_dtypes' bfloat16."""
    lib = library_of(x)
    if lib == "torch":
        t = x.detach().cpu()
        if dtype_name(t) == "bfloat16":
            import ml_dtypes

            return t.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if lib == "cupy":
        return x.get()
    if lib == "numba":
        return x.copy_to_host()
    return np.asarray(x)


def like(result: Any, ref: Any) -> Any:
    """Hand ``result`` back in the array library and device of ``ref`` (zero-copy where possible)."""
    lib = library_of(ref)
    if lib == "torch":
        torch = _torch()
        if isinstance(result, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(result))
        if library_of(result) == "torch":
            return result
        return torch.from_dlpack(result) if hasattr(result, "__dlpack__") else torch.as_tensor(
            result, device=ref.device
        )
    if lib == "cupy":
        import cupy

        if isinstance(result, cupy.ndarray):
            return result  # computed on ref's device; cupy.asarray would copy it to the current one
        with cupy.cuda.Device(ref.device.id):
            return cupy.asarray(result)
    if lib == "numba":
        from numba import cuda

        return cuda.as_cuda_array(result) if library_of(result) != "numpy" else cuda.to_device(result)
    return to_numpy(result)


def copy_into(dst: Any, src: Any) -> None:
    """Copy ``src`` into ``dst`` in place, both of ``dst``'s library and device (``like``)."""
    lib = library_of(dst)
    if lib == "torch":
        dst.copy_(src)
    elif lib == "cupy":
        import cupy

        cupy.copyto(dst, src)
    elif hasattr(dst, "copy_to_device"):  # Numba device arrays, the CUDA simulator's included
        dst.copy_to_device(src)
    else:
        np.copyto(dst, src)


# Result dtypes a torch tensor is made of through ``__cuda_array_interface__`` (what the ops return
# most: float32 outputs, uint8 records); others take DLPack.
_CAI_DTYPES = frozenset(("float32", "uint8"))


def backend_result(result: Any, ref: Any) -> Any:
    """``like(result, ref)`` for the result of a backend op, with a cheaper CuPy -> torch hand-over.

    The GPU backends queue their work on CuPy's current stream when it is not the default one, and
    otherwise on torch's current stream. In that second case torch already sees the work in order,
    so the result is wrapped through ``__cuda_array_interface__`` (zero-copy, same device, the
    tensor keeps ``result`` alive) instead of DLPack, whose exchange records an event on CuPy's
    stream and makes torch's wait on it: the same tensor, for a fraction of the host time.
    """
    if library_of(ref) == "torch" and library_of(result) == "cupy" and dtype_name(result) in _CAI_DTYPES:
        import cupy

        device = result.data.device_id
        if cupy.cuda.get_current_stream(device).ptr == 0:
            # The device is named so that a default device set in torch cannot move the result.
            return _torch().as_tensor(result, device=_torch_cuda_device(device))
    return like(result, ref)


_TORCH_DEVICES: dict[int, Any] = {}


def _torch_cuda_device(index: int) -> Any:
    device = _TORCH_DEVICES.get(index)
    if device is None:
        device = _TORCH_DEVICES[index] = _torch().device("cuda", index)
    return device


def _torch() -> Any:
    return sys.modules["torch"]
