"""The torch ops generated from the op contract (``_ops.SPECS``): every declared op exists with the
declared schema, its fake gives the shapes and dtypes the real op gives (and the declaration's rule
predicts) on fresh random CPU data, and ``torch.library.opcheck`` passes. (The declarations
themselves: ``test_ops_contract.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import turboquant_torch
import turboquant_torch.paged  # noqa: F401  (registers the paged ops)
from torch._subclasses.fake_tensor import FakeTensorMode
from turboquant_torch import _opgen
from turboquant_torch.ops import seed_arg

import turboquant_codec as tq
from turboquant_codec import _ops, _opspec

D, H, BS, NB = 64, 2, 16, 4
K_SEED, V_SEED = tq.stream_seed(5, 0), tq.stream_seed(5, 1)  # full 64-bit: negative on the wire


def _rand(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).to(dtype)


def _perm(seed: int, *lead: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([rng.permutation(D) for _ in range(int(np.prod(lead)))])
                            .reshape(*lead, D).astype(np.int32)).to(torch.uint16)


# --------------------------------------------------------------------------------------- the cases
def _codec_cases() -> list[tuple[str, tuple[object, ...]]]:
    x = _rand(1, 2, 3, 9, D)  # lead (2, 3)
    rec, ch = turboquant_torch.encode(x, bits=3.5, seed=K_SEED)
    v_rec, _ = turboquant_torch.encode(x, bits=3.0, mode="prod", seed=V_SEED)
    k, v = seed_arg(K_SEED), seed_arg(V_SEED)
    tail = _rand(2, 2, 3, 4, D)
    return [
        ("encode", (x, None, 3.5, "mse", k, True)),
        ("encode_given_channels", (x.half(), _perm(3, 2, 3), 2.5, "prod", k, False, "hadamard2")),
        ("encode_integer_bits", (x.bfloat16(), None, 3.0, "mse", v, True)),
        ("decode", (rec, ch, D, 3.5, "mse", k)),
        ("decode_integer_bits", (v_rec, None, D, 3.0, "prod", v)),
        ("decode_hadamard2", (turboquant_torch.encode(x, bits=3.5, seed=K_SEED, rotation="hadamard2")[0], ch,
                              D, 3.5, "mse", k, "hadamard2")),
        ("scores", (_rand(4, 2, 3, 5, D, dtype=torch.float16), rec, ch, 3.5, "mse", k)),
        # lead (2,), 3 KV heads, 6 query heads (GQA), 4 raw tail tokens.
        ("attention", (_rand(5, 2, 6, D), rec, ch, v_rec, None, 3.5, "mse", k, 3.0, "prod", v, 0.125,
                       tail, tail.clone())),
        ("attention_no_tail", (_rand(6, 2, 3, D), rec, ch, rec, ch, 3.5, "mse", k, 3.5, "mse", k, 0.2,
                               None, None)),
        # lead (): one sequence's 3 KV heads, float16 queries.
        ("attention_no_lead", (_rand(15, 3, D, dtype=torch.float16), rec[0], ch[0], v_rec[0], None,
                               3.5, "mse", k, 3.0, "prod", v, 0.125, tail[0], tail[0].clone())),
    ]


def _paged_cases() -> list[tuple[str, tuple[object, ...]]]:
    k_cfg, v_cfg = tq.CodecConfig(D, 3.5, "mse", K_SEED), tq.CodecConfig(D, 3.0, "prod", V_SEED)
    caches = [torch.zeros(NB, BS, H, c.record_bytes, dtype=torch.uint8) for c in (k_cfg, v_cfg)]
    channels = (_perm(7, H), None)
    raw = (_rand(8, 2, BS, H, D, dtype=torch.float16), _rand(9, 2, BS, H, D, dtype=torch.float16),
           torch.tensor([-1, 0, -1, 1], dtype=torch.int32))
    config = (3.5, "mse", seed_arg(K_SEED), 3.0, "prod", seed_arg(V_SEED), "auto")
    # Fill every slot, so attention reads records that were written.
    n = NB * BS
    fill = (*caches, _rand(10, n, H, D), _rand(11, n, H, D), torch.arange(n), *channels, *raw, *config)
    torch.ops.turboquant.paged_write(*fill)
    # A step of two requests (2 new tokens, then 1) and one padding row: T = 4.
    key, value = _rand(12, 4, H, D), _rand(13, 4, H, D)
    write = (*(c.clone() for c in caches), key, value, torch.tensor([18, 19, 62, -1]), *channels,
             *(r.clone() for r in raw[:2]), raw[2], *config)
    meta = (torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([20, 31], dtype=torch.int32),
            torch.tensor([0, 2, 3], dtype=torch.int32))
    attend = (torch.zeros(4, 2 * H, D), _rand(14, 4, 2 * H, D), key, value, *caches, *channels, *raw, *meta,
              0.125, -1, *config)
    return [("paged_write", write), ("paged_attention", attend)]


CASES = _codec_cases() + _paged_cases()


def _op(case: str) -> str:
    return next(name for name in sorted(_ops.OPS, key=len, reverse=True) if case.startswith(name))


def test_every_declared_op_has_a_case() -> None:
    assert {_op(name) for name, _ in CASES} == set(_ops.OPS)


# -------------------------------------------------------------------------------------- the schema
_KINDS = {"Tensor": "tensor", "Optional[Tensor]": "tensor?", "float": "float", "int": "int",
          "bool": "bool", "str": "str"}  # a SymInt argument's type reads "int"


@pytest.mark.parametrize("name", _ops.OPS)
def test_schema_matches_the_declaration(name: str) -> None:
    spec, schema = _ops.SPECS[name], getattr(torch.ops.turboquant, name).default._schema
    got = [(a.name, _KINDS[str(a.type)], a.default_value if a.has_default_value() else _opspec.REQUIRED,
            bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]
    assert got == [(a.name, a.kind, a.default, a.mutated) for a in spec.args]
    assert len(schema.returns) == len(spec.results)
    assert all(str(r.type) == "Tensor" for r in schema.returns)


# ------------------------------------------------------------------------------ fakes and real ops
def _tensors(out: object) -> list[torch.Tensor]:
    return [] if out is None else [out] if isinstance(out, torch.Tensor) else list(out)  # type: ignore[call-overload]


def _meta(ts: list[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in ts]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_fake_gives_what_the_real_op_gives(case: tuple[str, tuple[object, ...]]) -> None:
    name, args = case
    spec, op = _ops.SPECS[_op(name)], getattr(torch.ops.turboquant, _op(name)).default
    fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    real = _tensors(op(*fresh))
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = _tensors(op(*fakes))
    assert _meta(fake) == _meta(real)
    call = _opgen.Call(spec, tuple(args), {})
    declared = [(shape, getattr(torch, dtype)) for shape, dtype in spec.result_shapes(call.bound, call.cfg)]
    assert _meta(real) == declared
    first = args[0]
    assert isinstance(first, torch.Tensor) and all(t.device == first.device for t in real)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_opcheck(case: tuple[str, tuple[object, ...]]) -> None:
    name, args = case
    torch.library.opcheck(getattr(torch.ops.turboquant, _op(name)).default, args)
