"""``numba_launch`` without a GPU: ``DeviceView``'s layout and errors, and kernel parameters packed
exactly as Numba packs them (its CUDA target's array data model, ``_Kernel._prepare_args``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

numba_launch = pytest.importorskip("turboquant_codec.backends.numba_launch")
DeviceView = numba_launch.DeviceView


class _Foreign:
    """Any GPU array, as far as ``__cuda_array_interface__`` tells."""

    def __init__(self, shape, typestr, strides=None, ptr=4096):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False),
                                         "strides": strides, "version": 3}


@pytest.mark.parametrize("shape,dtype", [((3, 4), "float32"), ((2, 5, 7), "uint8"), ((6,), "uint16")],
                         ids=["f32-2d", "u8-3d", "u16-1d"])
def test_params_are_numpys_c_layout(shape, dtype) -> None:
    host = np.empty(shape, dtype)
    view = DeviceView(8192, shape, dtype, None)
    assert view.params == (0, 0, host.size, host.itemsize, 8192, *host.shape, *host.strides)
    assert view.size == host.size and view.ndim == host.ndim


def test_reshape_and_view_keep_the_bytes() -> None:
    view = DeviceView(8192, (4, 6), "uint8", None)
    words = view.reshape(24).view(np.uint32)
    assert words.shape == (6,) and words.ptr == 8192 and words.params[3] == 4
    assert view.reshape(2, 12).shape == (2, 12)
    with pytest.raises(ValueError, match="cannot reshape"):
        view.reshape(5, 5)
    with pytest.raises(ValueError, match="does not divide"):
        DeviceView(0, (3,), "uint8", None).view(np.uint32)


def test_of_reads_the_interface_and_relabels_bfloat16() -> None:
    bf16 = DeviceView.of(_Foreign((2, 3), "<V2"))
    assert bf16.dtype == np.uint16 and bf16.shape == (2, 3) and bf16.ptr == 4096
    dense = DeviceView.of(_Foreign((2, 3), "<f4", strides=(12, 4)))  # explicit C strides are fine
    assert dense.params[-2:] == (12, 4)
    assert DeviceView.of(dense) is dense
    scalar = DeviceView.of(_Foreign((), "<f4", strides=()))
    assert scalar.params == (0, 0, 1, 4, 4096)
    back = dense.__cuda_array_interface__
    assert back["shape"] == (2, 3) and back["typestr"] == "<f4" and back["data"][0] == 4096


def test_of_refuses_strided_arrays() -> None:
    with pytest.raises(ValueError, match="C-contiguous.*strides \\(4, 8\\)"):
        DeviceView.of(_Foreign((2, 3), "<f4", strides=(4, 8)))


def test_packing_matches_numbas_own() -> None:
    """Outside the simulator (no GPU needed): the CUDA target's array model has the member order
    ``ARRAY_MEMBERS`` flattens, and scalars pack to the same ctypes values as Numba's launcher."""
    script = textwrap.dedent("""
        import ctypes
        import numpy as np
        from numba.cuda import types
        from numba.cuda.descriptor import cuda_target
        from numba.cuda.dispatcher import _Kernel
        from turboquant_codec.backends import numba_launch

        model = cuda_target.target_context.data_model_manager.lookup(types.Array(types.float32, 2, "C"))
        assert tuple(model._fields) == numba_launch.ARRAY_MEMBERS, model._fields
        kernel = object.__new__(_Kernel)
        kernel.extensions = []
        for ty, value in [(types.int64, -7), (types.int32, 5), (types.uint32, 9),
                          (types.float32, np.float32(0.3)), (types.float64, 2.5), (types.boolean, True)]:
            theirs, ours = [], []
            kernel._prepare_args(ty, value, 0, [], theirs)
            numba_launch._packer(ty)(ours, value)
            assert [type(v) for v in ours] == [type(v) for v in theirs], (ty, ours, theirs)
            assert [getattr(v, "value", v) for v in ours] == [getattr(v, "value", v) for v in theirs], ty
        print("ok")
    """)
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
