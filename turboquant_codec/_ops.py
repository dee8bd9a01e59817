"""The op contract, declared once: every backend module implements these functions.

Backends receive arrays already converted by their own ``asarray`` and validated by the public API
(shapes, dtypes, finiteness, configuration); they return arrays of their own library. Every op is
defined by the NumPy reference backend (``backends/numpy_ref.py``); ``CAPABILITIES``
(``capabilities.py``) says which backend serves which op.

===============  ====================================================  =================================
op               arguments                                             returns
===============  ====================================================  =================================
encode           x (*lead, n, d) float16/bfloat16/float32, cfg,        (records, channels)
                 channels ((*lead, d) uint16 or None: choose the
                 outlier channels)
decode           enc: Encoded                                          (*lead, n, d) float32
scores           q (*lead, m, d), keys: Encoded (*lead, n, d)          (*lead, m, n) float32
attention        q (*lead, h_q, d), k, v: Encoded (*lead, h_kv, n,     (*lead, h_q, d) float32
                 d), scale, k_tail/v_tail (*lead, h_kv, t, d) or None
paged_write      cache: PagedCache, key/value [T, H, d],               (k_channels, v_channels)
                 slot_mapping [<= T]                                   (cache written in place)
paged_attention  cache: PagedCache, query [T, h_q, d], key/value       out [T, h_q, d] (written in
                 [T, H, d], block_table [B, max_blocks], seq_lens      place, rows of padding tokens
                 [B], query_start_loc [B + 1], scale, out,             untouched)
                 num_decodes (int or None)
===============  ====================================================  =================================

Op boundaries (``SPECS``, in ``_opspec``'s terms): the same ops as a foreign-function layer carries
them, each configuration spelled as fields, each cache as its tensors, with the backend to use or
the finiteness check as arguments. ``turboquant_torch`` generates its custom ops (schema, mutated
arguments, fake implementation) from these; ``name!`` is written in place, ``name?`` may be None,
results are (shape rule) dtype. Rendered by ``_opspec.render(SPECS)``; a test keeps this block
equal to it::

    encode(x, channels?, bits, mode, seed, check_finite, rotation="haar") ->
           records (x[:-1], R) uint8, channels (x[:-2], C) uint16
    decode(records, channels?, d, bits, mode, seed, rotation="haar") -> x (records[:-1], d) float32
    scores(q, records, channels?, bits, mode, seed, rotation="haar") ->
           scores (q[:-1], records[-2]) float32
    attention(q, k_records, k_channels?, v_records, v_channels?, k_bits, k_mode, k_seed, v_bits,
              v_mode, v_seed, scale, k_tail?, v_tail?, k_rotation="haar", v_rotation="haar") ->
              out (q) float32
    paged_write(k_cache!, v_cache!, key, value, slot_mapping, k_channels?, v_channels?, raw_k!?,
                raw_v!?, raw_slot_of_block?, k_bits, k_mode, k_seed, v_bits, v_mode, v_seed,
                backend, k_rotation="haar", v_rotation="haar") -> ()
    paged_attention(out!, query, key, value, k_cache, v_cache, k_channels?, v_channels?, raw_k?,
                    raw_v?, raw_slot_of_block?, block_table, seq_lens, query_start_loc, scale,
                    num_decodes, k_bits, k_mode, k_seed, v_bits, v_mode, v_seed, backend,
                    k_rotation="haar", v_rotation="haar") -> ()

Optional, for GPU backends: ``paged_attention_replay`` (the arguments of a ``paged_attention``
call just made) returns a callable that repeats that call holding no array (its launches on the
then current stream), or None; the public API replays it for later calls with the same arrays
(addresses, layouts) and scalars.

Optional, for host backends: ``paged_decoder(cache, block_table)`` returns ``step(query, key, value,
seq_lens, scale, out) -> out``, ``paged_attention`` bound to that cache and table for steps where
request r is query row r with one new token (everything derived from the cache prepared once);
``paged_decoder.PagedDecoder`` calls it when present (else ``paged_attention`` with
``query_start_loc = arange(B + 1)``).

The paged layout and its rules are owned by ``paged_cache.PagedCache``. Paged ops never
synchronise with the host on a GPU when ``num_decodes`` is given and every request is a decode
(the CUDA-graph case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ._opspec import Arg, Config, OpSpec, Result, config_args, rotation_arg
from .config import CodecConfig
from .encoded import Encoded
from .paged_cache import PagedCache


# ------------------------------------------------------------------------------- boundaries as data
def _t(name: str, mutated: bool = False) -> Arg:
    return Arg(name, "tensor", mutated=mutated)


def _opt(name: str, mutated: bool = False) -> Arg:
    return Arg(name, "tensor?", mutated=mutated)


def _paged_cache(mutated: bool) -> tuple[Arg, ...]:
    """The cache's channel permutations and raw side pool (its record caches stand apart: they lead
    ``paged_write`` but follow the new tokens in ``paged_attention``)."""
    return (_opt("k_channels"), _opt("v_channels"), _opt("raw_k", mutated), _opt("raw_v", mutated),
            _opt("raw_slot_of_block"))


# Schema order is the compatibility contract of callers (torch.ops.turboquant.*): rotations came
# later, so they trail with defaults; the paged ops spell their cache as tensors plus two configs
# and name the backend (vLLM picks it).
_KV = (*config_args("k_"), *config_args("v_"))
_KV_TAIL = (Arg("backend", "str"), rotation_arg("k_"), rotation_arg("v_"))
SPECS: dict[str, OpSpec] = {s.name: s for s in (
    OpSpec(
        "encode",
        args=(_t("x"), _opt("channels"), *config_args(), Arg("check_finite", "bool"), rotation_arg()),
        configs=(Config("", d="x"),),
        results=(Result("records", "uint8", "x[:-1], R"), Result("channels", "uint16", "x[:-2], C")),
    ),
    OpSpec(
        "decode",
        args=(_t("records"), _opt("channels"), Arg("d", "int"), *config_args(), rotation_arg()),
        configs=(Config("", d="d"),),
        results=(Result("x", "float32", "records[:-1], d"),),
    ),
    OpSpec(
        "scores",
        args=(_t("q"), _t("records"), _opt("channels"), *config_args(), rotation_arg()),
        configs=(Config("", d="q"),),
        results=(Result("scores", "float32", "q[:-1], records[-2]"),),
    ),
    OpSpec(
        "attention",
        args=(_t("q"), _t("k_records"), _opt("k_channels"), _t("v_records"), _opt("v_channels"), *_KV,
              Arg("scale", "float"), _opt("k_tail"), _opt("v_tail"), rotation_arg("k_"), rotation_arg("v_")),
        configs=(Config("k_", d="q"), Config("v_", d="q")),
        results=(Result("out", "float32", "q"),),
    ),
    OpSpec(
        "paged_write",
        args=(_t("k_cache", True), _t("v_cache", True), _t("key"), _t("value"), _t("slot_mapping"),
              *_paged_cache(True), *_KV, *_KV_TAIL),
        configs=(Config("k_", d="key"), Config("v_", d="key")),
    ),
    OpSpec(
        "paged_attention",
        args=(_t("out", True), _t("query"), _t("key"), _t("value"), _t("k_cache"), _t("v_cache"),
              *_paged_cache(False), _t("block_table"), _t("seq_lens"), _t("query_start_loc"),
              Arg("scale", "float"), Arg("num_decodes", "int"),  # -1 for None: a schema int is never None
              *_KV, *_KV_TAIL),
        configs=(Config("k_", d="key"), Config("v_", d="key")),
    ),
)}
OPS = tuple(SPECS)


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class Backend(Protocol):
    """What a backend module provides (module-level functions); a backend may serve a subset of
    ``OPS``, as its rows of ``CAPABILITIES`` declare.

    Dispatch hands callers the chosen module typed as this (``_dispatch.backend``), so every call
    into a backend is checked against it; ``tests/test_ops_contract.py`` checks each registered
    module's functions against it. Optional extras, looked up with ``hasattr``: ``attention_replay``,
    ``paged_attention_replay`` (a callable repeating a call just made; see ``_replay``),
    ``paged_decoder`` (see above).
    """

    __name__: str  # the module's

    def availability(self) -> Availability: ...

    def asarray(self, x: Any) -> Any: ...

    def encode(self, x: Any, cfg: CodecConfig, channels: Any) -> tuple[Any, Any]: ...

    def decode(self, enc: Encoded) -> Any: ...

    def scores(self, q: Any, keys: Encoded) -> Any: ...

    def attention(
        self, q: Any, k: Encoded, v: Encoded, scale: float, k_tail: Any, v_tail: Any
    ) -> Any: ...

    def paged_write(self, cache: PagedCache, key: Any, value: Any, slot_mapping: Any) -> tuple[Any, Any]: ...

    def paged_attention(
        self,
        cache: PagedCache,
        query: Any,
        key: Any,
        value: Any,
        block_table: Any,
        seq_lens: Any,
        query_start_loc: Any,
        scale: float,
        out: Any,
        num_decodes: int | None,
    ) -> Any: ...
