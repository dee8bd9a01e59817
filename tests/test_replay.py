"""The replay memo (``turboquant_codec._replay``) on the host: what a kept replay needs to run again.

The GPU tests of the replays themselves (new contents read, another ``out`` refused) are in
``test_cupy_paged.py`` and ``test_cupy_raw.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from turboquant_codec import _interop, _replay, tuning
from turboquant_codec.backends import cupy_paged, cupy_raw
from turboquant_codec.tuning import CupyRawTuning


def test_replay_runs_only_under_the_tuning_it_was_kept_for() -> None:
    calls: list[int] = []
    memo = _replay.Memo()
    memo.keep(("call",), lambda: calls.append(1))
    assert memo.replay(("call",)) and calls == [1]
    assert not memo.replay(("other",)) and not memo.replay(None)
    with tuning.using(cupy_raw=CupyRawTuning(attn_stages=2)):
        assert not memo.replay(("call",)), "a replay planned for other settings ran"
    assert memo.replay(("call",)) and calls == [1, 1]


def test_nothing_kept_for_no_replay_or_no_key() -> None:
    memo = _replay.Memo()
    memo.keep(("call",), None)
    memo.keep(None, lambda: None)
    assert len(memo) == 0


def test_bounded_oldest_first() -> None:
    memo = _replay.Memo(size=3)
    for i in range(5):
        memo.put(i, i)
    assert [memo.get(i) for i in range(5)] == [None, None, 2, 3, 4]


def test_keys_of_host_arrays_are_none() -> None:
    """Host arrays are checked by value on every call: never replayed."""
    a = np.zeros(3)
    assert _replay.arrays_key([a]) is None
    assert _replay.arrays_key([None]) == ((),)


class _CupyLike:
    """Taken for a CuPy array (``_interop.library_of`` goes by the type's module): its metadata."""

    __module__ = "cupy"

    def __init__(self, ptr: int, shape: tuple, strides: tuple, dtype: str, device: int) -> None:
        self.data = SimpleNamespace(ptr=ptr, device_id=device)
        self.shape, self.strides, self.dtype = shape, strides, np.dtype(dtype)


class _CudaTensorLike:
    """Taken for a CUDA torch tensor: its metadata through torch's accessors."""

    __module__ = "torch"
    is_cuda = True

    def __init__(self, ptr: int, shape: tuple, strides: tuple, dtype: str, device: int) -> None:
        self._ptr, self.shape, self._strides, self.dtype, self._device = ptr, shape, strides, dtype, device

    def data_ptr(self) -> int:
        return self._ptr

    def stride(self) -> tuple:
        return self._strides

    def get_device(self) -> int:
        return self._device


@pytest.mark.parametrize("make", [_CupyLike, _CudaTensorLike])
def test_identity_key_differs_in_each_of_address_shape_strides_dtype_device(make: Any) -> None:
    base = {"ptr": 4096, "shape": (2, 3), "strides": (3, 1), "dtype": "float32", "device": 0}
    key = _interop.gpu_key(make(**base))
    assert key is not None and key == _interop.gpu_key(make(**base))
    for name, other in (("ptr", 8192), ("shape", (3, 2)), ("strides", (1, 2)), ("dtype", "float16"),
                        ("device", 1)):
        assert _interop.gpu_key(make(**{**base, name: other})) != key, name


def test_every_memo_keys_arrays_by_the_one_identity_key() -> None:
    """The replay memo's and cupy_paged's launch keys are made of ``gpu_key``; a bfloat16 view
    (``_Raw16``) is told apart from its own uint16 words."""
    words = _CupyLike(4096, (2, 3), (6, 2), "uint16", 0)
    assert _replay.arrays_key([words, None]) == (_interop.gpu_key(words), ())
    assert cupy_paged._sig(words) == _interop.gpu_key(words)
    raw = cupy_raw._Raw16(words, "bfloat16")
    assert cupy_paged._sig(raw) != cupy_paged._sig(words)
    same = cupy_raw._Raw16(_CupyLike(4096, (2, 3), (6, 2), "uint16", 0), "bfloat16")
    assert cupy_paged._sig(raw) == cupy_paged._sig(same)
