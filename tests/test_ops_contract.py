"""Every registered backend module implements the op contract (``_ops.Backend``) for the ops its
capability rows declare: same positional parameters, in order; extras only with defaults."""

from __future__ import annotations

import importlib
import inspect

import pytest

from turboquant_codec import _ops
from turboquant_codec.backends import REGISTRY
from turboquant_codec.capabilities import CAPABILITIES


def _declared(name: str) -> list[str]:
    return ["availability", "asarray", *(op for op in _ops.OPS if name in CAPABILITIES[op])]


def _params(fn: object) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_backend_module_follows_the_contract(name: str) -> None:
    try:
        module = importlib.import_module(REGISTRY[name][0])
    except ImportError as exc:  # its library is missing here: nothing to check
        pytest.skip(f"{name} does not import here: {exc}")
    for op in _declared(name):
        assert callable(getattr(module, op, None)), f"{name} declares {op} but does not define it"
        want = _params(getattr(_ops.Backend, op))
        got = _params(getattr(module, op))
        assert [p.name for p in got[:len(want)]] == [p.name for p in want], f"{name}.{op}"
        extra = got[len(want):]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{name}.{op}: {extra}"


def test_every_op_is_declared_in_the_protocol() -> None:
    assert all(callable(getattr(_ops.Backend, op, None)) for op in _ops.OPS)
    assert all(set(CAPABILITIES[op]) <= set(REGISTRY) for op in _ops.OPS)
