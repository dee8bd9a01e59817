"""Every registered backend module implements the op contract (``_ops.Backend``) for the ops its
capability rows declare: same positional parameters, in order; extras only with defaults. The
contract's text agrees with its data (the boundary block renders ``SPECS``, the table names the
Protocol's parameters), and its declaration vocabulary (``_opspec``) refuses bad declarations."""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from collections.abc import Callable

import pytest

from turboquant_codec import _ops, _opspec
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


# ------------------------------------------------------------------------------ the contract's text
def test_docstring_shows_the_declarations() -> None:
    assert textwrap.indent(_opspec.render(_ops.SPECS), "    ") in (_ops.__doc__ or "")


def _table_rows() -> dict[str, str]:
    """The op table of ``_ops``'s docstring: op -> the text of its row (continuation lines too)."""
    lines = (_ops.__doc__ or "").splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=" * 15)]
    rows: dict[str, str] = {}
    op = ""
    for line in lines[rules[1] + 1:rules[2]]:  # the body: between the header's rule and the last
        head = line[:17].strip()
        op = head or op
        if op:
            rows[op] = rows.get(op, "") + line[17:]
    return rows


def test_table_agrees_with_the_protocol() -> None:
    rows = _table_rows()
    assert tuple(rows) == _ops.OPS
    for op in _ops.OPS:
        params = [p.name for p in _params(getattr(_ops.Backend, op))]
        words = set(re.findall(r"\w+", rows[op]))
        assert set(params) <= words, f"{op}: {set(params) - words} missing from its table row"


# ------------------------------------------------------------------------------------ the vocabulary
@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 5])
def test_seeds_round_trip_through_the_wire(seed: int) -> None:
    wire = _opspec.wire_seed(seed)
    assert -(2**63) <= wire < 2**63
    assert _opspec.wire_config(64, 3.0, "mse", wire).seed == seed


@pytest.mark.parametrize(("make", "message"), [
    (lambda: _opspec.Arg("x", "tensor[]"), "kind"),
    (lambda: _opspec.Arg("s", "float", mutated=True), "only tensors"),
    (lambda: _opspec.OpSpec("f", (_opspec.Arg("a", "int", 1), _opspec.Arg("b", "int"))), "follows"),
    (lambda: _opspec.OpSpec("f", (_opspec.Arg("cfg", "int"),)), "reserved"),
    (lambda: _opspec.OpSpec("f", (_opspec.Arg("x", "tensor"),), (_opspec.Config("", "x"),)), "lacks bits"),
    (lambda: _opspec.OpSpec("f", (_opspec.Arg("x", "tensor"),), (), (_opspec.Result("y", "float32", "z"),)),
     "unknown 'z'"),
    (lambda: _opspec.OpSpec("f", (_opspec.Arg("x", "tensor"),), (), (_opspec.Result("y", "float32", "x["),)),
     "bad shape term"),
    (lambda: _opspec.OpSpec("f", (_opspec.Arg("x", "tensor"),), (), (_opspec.Result("y", "float32", "x[]"),)),
     "bad shape term"),
    (lambda: _opspec.OpSpec("f", (_opspec.Arg("x", "tensor"),), (), (_opspec.Result("y", "uint8", "x, R"),)),
     "unknown 'R'"),  # a symbol needs a configuration
])
def test_bad_declarations_are_refused(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_bind_fills_defaults_and_refuses_what_the_schema_would() -> None:
    spec = _ops.SPECS["decode"]
    bound = spec.bind(("r", None, 64, 3.0, "mse", 0), {})
    assert bound["rotation"] == "haar" and bound["d"] == 64
    assert spec.bind(("r", None, 64, 3.0, "mse", 0), {"rotation": "hadamard"})["rotation"] == "hadamard"
    with pytest.raises(TypeError, match="missing argument seed"):
        spec.bind(("r", None, 64, 3.0, "mse"), {})
    with pytest.raises(TypeError, match="unknown arguments"):
        spec.bind(("r", None, 64, 3.0, "mse", 0), {"sead": 1})
    with pytest.raises(TypeError, match="takes 7 arguments"):
        spec.bind(tuple(range(8)), {})
