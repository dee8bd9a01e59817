"""Which array library and device an input lives in, and handing results back to it.

Recognised without importing anything: NumPy arrays, torch tensors (CPU or CUDA), CuPy arrays and
Numba device arrays (anything with ``__cuda_array_interface__``). GPU results are handed back
zero-copy through DLPack or ``__cuda_array_interface__``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def library_of(x: Any) -> str:
    """``"numpy"``, ``"torch"``, ``"cupy"`` or ``"numba"`` (any other CUDA array interface)."""
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return "torch"
    if module == "cupy":
        return "cupy"
    if hasattr(x, "__cuda_array_interface__"):
        return "numba"
    return "numpy"


def on_gpu(x: Any) -> bool:
    """Whether ``x`` lives in GPU memory."""
    lib = library_of(x)
    if lib == "torch":
        return bool(x.is_cuda)
    return lib in ("cupy", "numba")


def dtype_name(x: Any) -> str:
    """Dtype of ``x`` as a plain name (``"float16"``, ``"bfloat16"``, ...), whatever its library."""
    return str(x.dtype).removeprefix("torch.")


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


def _torch() -> Any:
    return sys.modules["torch"]
