"""The vocabulary of the op contract's boundary declarations (``_ops.SPECS``).

An op's boundary is what a foreign-function layer (the torch custom ops of ``turboquant_torch``)
carries: ordered arguments of plain kinds, each configuration spelled as its fields, results given
by a shape rule. Declaring it as data lets a generator build the schema, the shape-only (fake)
implementation and the documentation from one place. Plain Python only: no array library here.

Shape rules (``Result.shape``) are comma-separated terms, concatenated:

=============  ===================================================================
term           dimensions
=============  ===================================================================
``x``          all of argument ``x``'s shape
``x[i]``       its dimension ``i`` (one)
``x[a:b]``     the slice ``a:b`` of its shape (either end may be omitted)
``d``          the head dimension of the op's first configuration
``R``          that configuration's ``record_bytes``
``C``          its channel-permutation length: ``d`` when its bits split channels, else 0
=============  ===================================================================

Results live on the device of the op's first (not optional) tensor argument.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import _validate
from .config import CodecConfig

# Argument kinds: tensors (``?``: may be None) and scalars.
KINDS = ("tensor", "tensor?", "float", "int", "bool", "str")
REQUIRED = object()  # an argument without a default
RESERVED = ("bound", "cfg")  # names a generator may use beside the arguments
_SYMBOLS = {"d": lambda c: c.d, "R": lambda c: c.record_bytes, "C": lambda c: c.d if c.split else 0}
_TERM = re.compile(r"^(\w+)(?:\[(-?\d*)(:)?(-?\d*)\])?$")


# ------------------------------------------------------------------------------------ seeds on wire
def wire_seed(seed: int, name: str = "seed") -> int:
    """A codec seed (an integer in ``[0, 2**64)``, checked) as the int64 an op boundary carries.

    Seeds are unsigned 64-bit in the codec but op schemas carry signed int64, so they travel as their
    two's complement; ``wire_config`` maps them back. The one place that convention lives.
    """
    seed = _validate.seed(seed, name)
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def wire_config(d: int, bits: float, mode: str, seed: int, rotation: str = "haar") -> CodecConfig:
    """``CodecConfig`` from boundary arguments: ``seed`` is the signed int64 of ``wire_seed``."""
    seed = _validate.integer(seed, "seed", -(1 << 63), _validate.MAX_SEED)
    return CodecConfig(d=d, bits=bits, mode=mode, seed=seed & _validate.MAX_SEED, rotation=rotation)


# ------------------------------------------------------------------------------------ declarations
@dataclass(frozen=True)
class Arg:
    """One argument, in schema order.

    Parameters
    ----------
    name : str
    kind : str
        One of ``KINDS``.
    default : object
        Only on trailing arguments; ``REQUIRED`` when none.
    mutated : bool
        Written in place by the op (tensor kinds only).
    """

    name: str
    kind: str
    default: Any = REQUIRED
    mutated: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.mutated and not self.kind.startswith("tensor"):
            raise ValueError(f"{self.name}: only tensors can be mutated")


@dataclass(frozen=True)
class Result:
    """One returned tensor: its name (documentation only), dtype name and shape rule."""

    name: str
    dtype: str
    shape: str


@dataclass(frozen=True)
class Config:
    """A ``CodecConfig`` spelled as arguments ``{prefix}bits``, ``{prefix}mode``, ``{prefix}seed``
    (``wire_seed``) and ``{prefix}rotation``; its head dimension is argument ``d``'s last dimension
    (a tensor) or value (an int)."""

    prefix: str
    d: str

    @functools.cached_property  # read on every call of an op: built once
    def fields(self) -> tuple[str, str, str, str]:
        """Its arguments' names, in ``wire_config``'s order after ``d``."""
        p = self.prefix
        return f"{p}bits", f"{p}mode", f"{p}seed", f"{p}rotation"

    @functools.cached_property
    def key(self) -> str:
        """The name ``OpSpec.build_configs`` files it under: the prefix without its underscore."""
        return self.prefix.rstrip("_")


def config_args(prefix: str = "") -> tuple[Arg, Arg, Arg]:
    """The bits, mode and seed arguments of a ``Config`` (its rotation, which has a default, comes
    last in every schema, so it is declared there)."""
    return Arg(f"{prefix}bits", "float"), Arg(f"{prefix}mode", "str"), Arg(f"{prefix}seed", "int")


def rotation_arg(prefix: str = "") -> Arg:
    return Arg(f"{prefix}rotation", "str", "haar")


@dataclass(frozen=True)
class OpSpec:
    """One op's boundary: arguments in order, the configurations they spell, results (none for an
    op that only writes into its mutated arguments)."""

    name: str
    args: tuple[Arg, ...]
    configs: tuple[Config, ...] = ()
    results: tuple[Result, ...] = ()

    def __post_init__(self) -> None:
        names = [a.name for a in self.args]
        if len(set(names)) != len(names) or set(names) & set(RESERVED):
            raise ValueError(f"{self.name}: duplicate or reserved argument names")
        tail = [a.default is not REQUIRED for a in self.args]
        if any(has and not later for has, later in zip(tail, tail[1:], strict=False)):
            raise ValueError(f"{self.name}: an argument without a default follows one with a default")
        for c in self.configs:
            for field in c.fields:
                if field not in names:
                    raise ValueError(f"{self.name}: config {c.prefix!r} lacks {field}")
        for r in self.results:
            for term in r.shape.split(","):
                name = _parse(term)[0]
                if name not in self.tensors and (name not in _SYMBOLS or not self.configs):
                    raise ValueError(f"{self.name}: result {r.name}'s rule names unknown {name!r}")

    @property
    def tensors(self) -> tuple[str, ...]:
        """The tensor arguments' names (what a shape rule's terms may name, besides ``d R C``)."""
        return tuple(a.name for a in self.args if a.kind.startswith("tensor"))

    @property
    def mutated(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.mutated)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """A call's arguments by name, defaults filled in; TypeError on a missing or unknown one."""
        if len(args) == len(self.args) and not kwargs:
            # The dispatcher's usual call (defaults filled in): the hot path of every op.
            return dict(zip(self.names, args, strict=True))
        if len(args) > len(self.args):
            raise TypeError(f"{self.name} takes {len(self.args)} arguments, got {len(args)}")
        unknown = set(kwargs) - {a.name for a in self.args}
        if unknown:
            raise TypeError(f"{self.name} got unknown arguments {sorted(unknown)}")
        bound = dict(zip(self.names, args, strict=False))
        for a in self.args[len(args):]:
            value = kwargs.get(a.name, a.default)
            if value is REQUIRED:
                raise TypeError(f"{self.name} is missing argument {a.name}")
            bound[a.name] = value
        return bound

    def build_configs(self, bound: Mapping[str, Any]) -> dict[str, CodecConfig]:
        """A call's configurations by ``Config.key`` (``""`` for an op's only one)."""
        out = {}
        for c in self.configs:
            src = bound[c.d]  # a tensor or an int (a SymInt while torch.compile traces)
            d = src.shape[-1] if hasattr(src, "shape") else src
            bits, mode, seed, rotation = c.fields
            out[c.key] = wire_config(d, bound[bits], bound[mode], bound[seed], bound[rotation])
        return out

    def result_shapes(self, bound: Mapping[str, Any], configs: Mapping[str, CodecConfig]
                      ) -> list[tuple[tuple[int, ...], str]]:
        """(shape, dtype name) of each result by its rule, from the call's arguments."""
        cfg = next(iter(configs.values()), None)
        return [(_shape(r.shape, {n: bound[n] for n in self.tensors}, cfg), r.dtype) for r in self.results]

    def signature(self) -> str:
        """One line of documentation: ``name(arg, opt?, written!, kw="default") -> results``."""
        return " ".join(self._words())

    def _words(self) -> list[str]:
        """The signature's pieces that a line break may not split (an argument, a result)."""
        args = []
        for a in self.args:
            text = a.name + ("!" if a.mutated else "") + ("?" if a.kind.endswith("?") else "")
            args.append(text if a.default is REQUIRED else f"{text}={json.dumps(a.default)}")
        words = [w + "," for w in args[:-1]] + [args[-1] + ")", "->"]
        words[0] = f"{self.name}({words[0]}"
        results = [f"{r.name} ({r.shape}) {r.dtype}" for r in self.results] or ["()"]
        return words + [w + "," for w in results[:-1]] + results[-1:]


def _parse(term: str) -> tuple[str, str | None, bool, str | None]:
    m = _TERM.match(term.strip())
    if m is None or (m.group(2) == "" and m.group(3) is None):  # "x[]"
        raise ValueError(f"bad shape term {term!r}")
    return m.group(1), m.group(2), m.group(3) is not None, m.group(4)


def _shape(rule: str, tensors: Mapping[str, Any], cfg: Any) -> tuple[int, ...]:
    dims: list[int] = []
    for term in rule.split(","):
        name, start, is_slice, stop = _parse(term)
        if name in tensors:
            shape = tuple(tensors[name].shape)
            if is_slice:
                dims += shape[int(start) if start else None:int(stop) if stop else None]
            elif start is not None:
                dims.append(shape[int(start)])
            else:
                dims += shape
            continue
        dims.append(_SYMBOLS[name](cfg))  # OpSpec refuses a symbol in an op without configurations
    return tuple(dims)


def render(specs: Mapping[str, OpSpec], width: int = 96) -> str:
    """The signatures of ``specs``, one op after another, wrapped at ``width``: the block the
    contract's docstring shows (indented by four)."""
    lines = []
    for spec in specs.values():
        line, indent = "", " " * (len(spec.name) + 1)
        for word in spec._words():
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = indent + word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "\n".join(lines)
