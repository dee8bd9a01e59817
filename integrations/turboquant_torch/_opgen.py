"""``torch.library`` custom ops generated from the op contract's declarations (``_ops.SPECS``).

One declaration gives an op its schema, its mutated arguments and its fake (shape-only)
implementation; the caller writes only the two things that differ per op: the body (a thin call
into ``turboquant_codec``) and the argument checks the fake shares with the op (metadata only, so
``torch.compile`` and ``opcheck`` see the op's refusals). Both receive a ``Call``: the arguments by
name and the configurations they spell.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from turboquant_codec._ops import SPECS
from turboquant_codec._opspec import REQUIRED, OpSpec

NAMESPACE = "turboquant"
_TYPES = {"tensor": "Tensor", "tensor?": "Tensor?", "float": "float", "int": "SymInt", "bool": "bool",
          "str": "str"}


class Call:
    """One call's arguments as attributes (``call.x``) and its configurations (``call.cfg["k"]``,
    ``call.cfg[""]`` for an op's only one)."""

    def __init__(self, spec: OpSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.bound = spec.bind(args, kwargs)
        self.cfg = spec.build_configs(self.bound)
        self.__dict__.update(self.bound)  # no argument is named bound or cfg (_opspec.RESERVED)

    def __getattr__(self, name: str) -> Any:  # typing only: every argument is set in __init__
        raise AttributeError(name)


def schema(spec: OpSpec) -> str:
    """The ``torch.library`` schema of ``spec`` (without its name); mutated tensors get alias sets
    numbered by position, as ``torch.library.infer_schema`` numbers them."""
    args = []
    for i, a in enumerate(spec.args):
        kind = _TYPES[a.kind].replace("Tensor", f"Tensor(a{i}!)") if a.mutated else _TYPES[a.kind]
        args.append(f"{kind} {a.name}" + ("" if a.default is REQUIRED else f"={json.dumps(a.default)}"))
    results = ["Tensor"] * len(spec.results)
    returns = results[0] if len(results) == 1 else f"({', '.join(results)})"
    return f"({', '.join(args)}) -> {returns}"


def define(name: str, body: Callable[[Call], Any], check: Callable[[Call], None]) -> Any:
    """Register ``turboquant::{name}`` as declared in ``SPECS[name]``.

    Parameters
    ----------
    name : str
        A key of ``_ops.SPECS``.
    body : callable
        ``body(call)``: the real op; returns its results (None when it has none).
    check : callable
        ``check(call)``: raises what the op raises for these arguments' metadata; the fake runs it
        before allocating the declared results.

    Returns
    -------
    torch.library.CustomOpDef
    """
    spec = SPECS[name]

    def kernel(*args: Any, **kwargs: Any) -> Any:
        return body(Call(spec, args, kwargs))

    def fake(*args: Any, **kwargs: Any) -> Any:
        call = Call(spec, args, kwargs)
        check(call)
        like = next(call.bound[a.name] for a in spec.args if a.kind == "tensor")
        out = tuple(like.new_empty(shape, dtype=getattr(torch, dtype))
                    for shape, dtype in spec.result_shapes(call.bound, call.cfg))
        return None if not out else out[0] if len(out) == 1 else out

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", kernel, mutates_args=spec.mutated,
                                 schema=schema(spec))
    op.register_fake(fake)
    return op
