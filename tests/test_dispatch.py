"""``backend="auto"``: the first backend, in the registry's preference for where the data lives, whose
capability row serves the request and that is available; the error when none does lists every
backend's reason. Availability is faked, so the choice is checked on any machine."""

from __future__ import annotations

import pytest

from turboquant_codec import _dispatch
from turboquant_codec import backends as registry
from turboquant_codec._ops import Availability
from turboquant_codec.config import CodecConfig


@pytest.fixture
def gpu_backends_available(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry, "availability", lambda name: Availability(True))
    monkeypatch.delenv("TQ_BACKEND", raising=False)
    _dispatch._choose.cache_clear()
    yield
    _dispatch._choose.cache_clear()


def _auto(op: str, d: int, where: str = "cuda", dtype: str | None = "float32") -> str:
    module = _dispatch._choose(op, registry.requested("auto"), where, (CodecConfig(d, 3.5),), dtype)
    return next(name for name, (path, _) in registry.REGISTRY.items() if path == module.__name__)


@pytest.mark.usefixtures("gpu_backends_available")
def test_auto_takes_the_first_backend_that_serves_the_request() -> None:
    assert _auto("encode", 128) == "cupy_raw"  # first preference, serves d=128
    assert _auto("encode", 256) == "numba_cuda"  # cupy_raw's row stops at 128: the next one serves
    assert _auto("attention", 256) == "numba_cuda"
    assert _auto("paged_attention", 64, "cpu", None) == "numba_cpu"


@pytest.mark.usefixtures("gpu_backends_available")
def test_auto_refusal_lists_every_backend_reason() -> None:
    with pytest.raises(RuntimeError, match=r"no backend serves encode for input on a GPU "
                                           r"\(cupy_raw: does not support head dimension 512.*; "
                                           r"numba_cuda: does not support head dimension 512"):
        _auto("encode", 512)


def test_auto_skips_an_unavailable_backend_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "availability",
                        lambda name: Availability(name != "cupy_raw", "no CUDA device: test"))
    monkeypatch.delenv("TQ_BACKEND", raising=False)
    _dispatch._choose.cache_clear()
    try:
        assert _auto("encode", 128) == "numba_cuda"
        absent = Availability(False, "no CUDA device: test")
        monkeypatch.setattr(registry, "availability", lambda name: absent)
        _dispatch._choose.cache_clear()
        with pytest.raises(RuntimeError, match="cupy_raw: not available: no CUDA device: test; "
                                               "numba_cuda: not available"):
            _auto("encode", 128)
    finally:
        _dispatch._choose.cache_clear()
