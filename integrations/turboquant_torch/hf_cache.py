"""A Hugging Face transformers ``Cache`` that keeps the KV history as TurboQuant records, paged.

Layout of one layer (``B`` batch rows, ``H`` KV heads, ``d`` head dim, ``bs`` tokens per block,
``cap`` blocks per row, ``R_k`` / ``R_v`` record bytes; ``S`` sinks, ``F`` flush interval)::

    packed      [B * cap, H, bs, R_k + R_v]  uint8   K record then V record per (block, head, slot)
    k_records,  [B * cap, bs, H, R_k / R_v]  uint8   views of ``packed`` (``turboquant_codec.
    v_records                                        paged_cache``'s layout; vLLM's packing)
    raw         [2, num_raw, bs, H, d]  model dtype  raw side pool: the blocks read uncompressed;
    raw_k,      [num_raw, bs, H, d]                  ``raw[0]`` and ``raw[1]`` (one scatter writes
    raw_v                                            a step's K and V)
    raw_of      [B, cap] int (host)                  raw-pool row of each block, -1 = read the records
    raw_slot_of_block  [B * cap] int32 (device)      the same map, flat, as the paged op reads it
    block_table [B, cap] int32 (device)              row r's block j is physical block r * cap + j
    n, c        [B] int (host)                       per row: stored tokens; end of the compressed part
    plan        [P, B] int64 (device)                raw-pool slot of each row's k-th next fast append
                                                     (``P = min(F, PLAN_TOKENS)``)

Each row stores only its real tokens (masked, i.e. padded, positions are never stored), in order;
RoPE is already in the keys, so a token's place in the row is all attention needs. Positions
``[0, S)`` are the sinks, ``[S, c)`` are compressed, ``[c, n)`` are the recent buffer. When the
buffer holds ``F`` tokens or more after a step, its oldest whole multiples of ``F`` are compressed
in one batch (each token exactly once). The first such batch of a layer fixes each head's outlier
channels (half-integer bits) from its tokens, pooled over the rows that flush; sinks and padding
never enter that choice.

A block is read raw (has a raw-pool row) when any of its positions is a sink or in the buffer; the
others are read from their records. Compressed positions inside a raw block (``S`` or ``c`` not a
multiple of ``bs``: at most two blocks per row) hold their *decoded* values in the raw row, so every
token is read exactly as the decoded-copy cache (``baselines.DecodedCopyCache``) reads it, at any
block size. Records are written when tokens are compressed, never before.

Steps (the registered attention, ``hf_attention``, drives them): ``update`` only checks and holds
the new tokens; the attention function then runs either ``tq.paged_attention`` over the records,
the raw pool and the new token (one call per layer: single-token steps with every row's token real,
once something is compressed), or SDPA over the history decoded transiently (multi-token steps,
padded new tokens, or nothing compressed yet); ``commit`` then stores the new tokens and flushes.
Each commit plans the one-token steps up to the next flush (at most ``P - 1``): their raw blocks
are mapped ahead and their slots listed in ``plan``, so such a step (the fast append) needs no host
work but counting, block edges included. On CUDA it runs the paged op and the append as the layer's
CUDA graph (``run_step``, ``step_graph.StepGraph``); the device copies of the step metadata are
rewritten in place, so the graph and the op's kept launches outlive new raw blocks and flushes.

Seeds: layer ``i`` encodes keys with ``stream_seed(seed, 2 i)`` and values with
``stream_seed(seed, 2 i + 1)``. Other compressors (``baselines``) plug in through ``quantizer=``;
their payloads are stored the same way (``[B * cap, bs, H, P]``) and always read decoded.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

import turboquant_codec as tq
from turboquant_codec import _validate
from turboquant_codec.transforms import stream_seed

from .ops import TorchCodec
from .ops import decode as _decode
from .ops import encode as _encode
from .step_graph import StepGraph

# Keys get half a bit more than values at the same bits per value (3.5 on average): in the seeds x texts
# sweep (docs/quality-seeds.md, third sweep) the split lowered the KL in 25 of 30 seed-paired cells
# (pooled 0.0070 against 0.0094 at 3.5 bits). The vLLM plugin keeps 3.5 / 3.5: there two bit widths
# cost a second write launch per layer (benchmarks/RESULTS-paged.md); this cache encodes K and V
# apart in any case.
DEFAULT_KEY_BITS = 4.0
DEFAULT_VALUE_BITS = 3.0
DEFAULT_MODE = "mse"
# Rotation kind and seed candidates per stream, chosen by the seeds x texts sweep (docs/quality-seeds.md):
# the rotation kinds were level within the spread of seeds, so the one with the per-input MSE bound
# stays; choosing a seed among 4 at the first flush did not lower the KL.
DEFAULT_ROTATION = "haar"
DEFAULT_SEED_CANDIDATES = 1
# What a key stream's seed candidates are ranked by (values always by reconstruction): the attention
# criteria did not lower the KL either (docs/quality-seeds.md, second sweep).
SEED_CRITERIA = ("reconstruction", "scores", "attention")
DEFAULT_SEED_CRITERION = "reconstruction"
# Tuned on SmolLM2-135M / GPL-3 (docs/eval-smollm2.md): flush 256 beat 128; more sinks did not pay.
DEFAULT_FLUSH = 256
DEFAULT_SINKS = 4
# 16: the fused CUDA decode kernel reads 16-token tiles of one block.
DEFAULT_BLOCK = 16
# One-token steps planned at once (raw blocks mapped ahead, slots listed), at most: the default flush
# interval, so a default cache plans once per flush; it also bounds the raw blocks mapped ahead.
PLAN_TOKENS = 256


def _transformers_version() -> tuple[int, int]:
    import transformers

    return tuple(int(x) for x in transformers.__version__.split(".")[:2])  # type: ignore[return-value]


CACHE_ARG = "cache" if _transformers_version() >= (5, 24) else "past_key_values"
"""The keyword models and ``generate`` take the cache by (``past_key_values`` before 5.24)."""
NOT_DRIVEN = ("the previous step's attention did not go through the registered attention: load the model "
              "with attn_implementation='turboquant' (or call turboquant_torch.hf_attention.use(model)) "
              "when using TurboQuantCache")


class KVQuantizer(Protocol):
    """What a layer needs from the compressor of its keys or of its values.

    ``payload`` is whatever the compressor stores per vector, shaped (B, H, n, *).
    """

    label: str

    def calibrate(self, x: Tensor) -> None:
        """Fix per-head state (outlier channels) from the first flushed tokens ``x`` (B, H, n, d)."""

    def encode(self, x: Tensor) -> Tensor:
        """Payload (B, H, n, *) of ``x`` (B, H, n, d)."""
        ...

    def decode(self, payload: Tensor) -> Tensor:
        """Vectors (B, H, n, d) float32 of a payload."""
        ...

    def stored_nbytes(self, payload: Tensor) -> int:
        """Honest bytes the payload stands for (records, scales, norms)."""
        ...

    def metadata_nbytes(self) -> int:
        """Bytes of fixed per-layer state (outlier channel permutations), counted once."""
        ...

    def reset(self) -> None:
        """Forget calibration (a new sequence recalibrates on its first flush)."""


QuantizerFactory = Callable[[str, int, int], KVQuantizer]
"""``factory(kind, layer_idx, head_dim)`` with ``kind`` in {"key", "value"}."""


class TurboQuantizer:
    """TurboQuant records through ``TorchCodec``: per-head outlier channels and the stream's seed,
    both fixed at calibration.

    Parameters
    ----------
    d : int
        Head dimension.
    bits : float
        Nominal code bits per channel (mse 1-4, prod 2-5, halves allowed).
    mode : {"mse", "prod"}
    seed : int
        This stream's seed (``stream_seed``): the first seed candidate.
    rotation : {"haar", "hadamard2", "hadamard"}
        Rotation kind (``turboquant_codec.CodecConfig``).
    seed_candidates : int
        Seeds tried at calibration: ``seed`` and ``stream_seed(seed, j)`` for ``j = 1 ..
        seed_candidates - 1``; the one of least ``criterion`` error on the calibration tokens becomes
        the stream's seed, kept in ``codec.config`` beside the channel list. 1 keeps ``seed`` (no
        search). A fixed ``"hadamard"`` rotation does not depend on the seed, so it never searches.
    criterion : {"reconstruction", "scores", "attention"}
        The error that ranks the candidates (``calibration_error``): squared reconstruction error;
        squared error of the attention logits ``q . k``; or KL between the attention weights with
        exact and with reconstructed keys. The two attention criteria take the calibration tokens
        themselves as the queries (the cache does not see the model's queries), each attending
        causally to the earlier tokens of its sequence. Meant for key streams.
    """

    def __init__(self, d: int, bits: float, mode: str, seed: int, rotation: str = "haar",
                 seed_candidates: int = 1, criterion: str = DEFAULT_SEED_CRITERION) -> None:
        if not isinstance(seed_candidates, int) or seed_candidates < 1:
            raise ValueError(f"seed_candidates must be an integer >= 1, got {seed_candidates!r}")
        if criterion not in SEED_CRITERIA:
            raise ValueError(f"seed criterion must be one of {SEED_CRITERIA}, got {criterion!r}")
        self.base_seed, self.seed_candidates, self.criterion = seed, seed_candidates, criterion
        self.codec = TorchCodec(d, bits, mode, seed, check_finite=False, rotation=rotation)
        self.label = f"TurboQuant {mode} {self.codec.bits:g} {rotation}"

    @property
    def record_bytes(self) -> int:
        return self.codec.record_bytes

    def candidate_seeds(self) -> list[int]:
        """The seeds calibration chooses among (the configured one first)."""
        if self.codec.rotation == "hadamard":
            return [self.base_seed]
        return [self.base_seed] + [stream_seed(self.base_seed, j) for j in range(1, self.seed_candidates)]

    def _channels(self, batch: int, device: torch.device) -> Tensor | None:
        # Channels are per head (H, d); the op wants one permutation per (batch, head) stream.
        ch = self.codec.channels_on(device)
        return None if ch is None else ch.expand(batch, -1, -1).contiguous()

    def _with_seed(self, seed: int) -> TorchCodec:
        c = self.codec
        return TorchCodec(c.d, c.bits, c.mode, seed, channels=c.channels, check_finite=False,
                          rotation=c.rotation)

    def calibrate(self, x: Tensor) -> None:
        b, h, n, d = x.shape
        # Pool the batch: one choice per head (channels) and per stream (seed), shared by every
        # sequence in the batch.
        pooled = x.transpose(0, 1).reshape(h, b * n, d)
        if self.codec.split:
            self.codec.calibrate(pooled)
        seeds = self.candidate_seeds()
        if len(seeds) > 1:
            errors = []
            for seed in seeds:
                codec = self._with_seed(seed)
                rec = codec.decode(codec.encode(pooled)).reshape(h, b, n, d).transpose(0, 1)
                errors.append(calibration_error(x, rec, self.criterion))
            self.codec = self._with_seed(seeds[int(np.argmin(errors))])

    def encode(self, x: Tensor) -> Tensor:
        c = self.codec
        records, _ = _encode(x, bits=c.bits, mode=c.mode, seed=c.seed,
                             channels=self._channels(x.shape[0], x.device), check_finite=False,
                             rotation=c.rotation)
        return records

    def decode(self, payload: Tensor) -> Tensor:
        c = self.codec
        return _decode(payload, self._channels(payload.shape[0], payload.device), d=c.d, bits=c.bits,
                       mode=c.mode, seed=c.seed, rotation=c.rotation)

    def stored_nbytes(self, payload: Tensor) -> int:
        return int(payload.numel() * payload.element_size())

    def metadata_nbytes(self) -> int:
        ch = self.codec.channels
        # The chosen seed (8 bytes) travels with the channel list when there was a choice.
        return (0 if ch is None else int(ch.numel() * ch.element_size())) + (
            8 if len(self.candidate_seeds()) > 1 else 0)

    def reset(self) -> None:
        self.codec = TorchCodec(self.codec.d, self.codec.bits, self.codec.mode, self.base_seed,
                                check_finite=False, rotation=self.codec.rotation)


def calibration_error(x: Tensor, rec: Tensor, criterion: str) -> float:
    """The error ``criterion`` ranks seed candidates by (``TurboQuantizer``), summed over the batch.

    Parameters
    ----------
    x, rec : Tensor (B, H, n, d)
        Calibration tokens and their reconstruction through one candidate's records.
    criterion : {"reconstruction", "scores", "attention"}
        ``sum |rec - x|^2``; ``sum_{j < i} (x_i . (rec_j - x_j))^2``, the logit errors with the tokens
        as their own queries, each query over the earlier tokens of its sequence; or
        ``sum_i KL(p_i || p^_i)`` for the attention weights ``p_i = softmax_{j < i}(x_i . x_j / sqrt(d))``
        and ``p^_i`` the same over ``rec_j`` (query 0 has nothing earlier and adds 0).

    Returns
    -------
    float
    """
    x64, rec64 = x.double(), rec.double()
    if criterion == "reconstruction":
        return float(((rec64 - x64) ** 2).sum())
    n, d = x.shape[-2], x.shape[-1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)  # [i, j]: j < i
    if criterion == "scores":
        err = x64 @ (rec64 - x64).transpose(-1, -2)
        return float((err[..., earlier] ** 2).sum())
    if criterion != "attention":
        raise ValueError(f"seed criterion must be one of {SEED_CRITERIA}, got {criterion!r}")
    exact, approx = ((x64 @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~earlier, -math.inf)
                     for k in (x64, rec64))
    log_p, log_q = exact[..., 1:, :].log_softmax(-1), approx[..., 1:, :].log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(~earlier[1:], 0.0)
    return float(kl.sum())


def turboquant_factory(
    key_bits: float = DEFAULT_KEY_BITS, value_bits: float = DEFAULT_VALUE_BITS, key_mode: str = DEFAULT_MODE,
    value_mode: str = DEFAULT_MODE, seed: int = 0, rotation: str = DEFAULT_ROTATION,
    seed_candidates: int = DEFAULT_SEED_CANDIDATES, seed_criterion: str = DEFAULT_SEED_CRITERION,
) -> QuantizerFactory:
    """Factory of per-layer TurboQuant quantizers with per-layer, per-K/V seeds; key streams rank
    their seed candidates by ``seed_criterion``, value streams by reconstruction."""

    def make(kind: str, layer_idx: int, head_dim: int) -> KVQuantizer:
        key = kind == "key"
        return TurboQuantizer(head_dim, key_bits if key else value_bits, key_mode if key else value_mode,
                              stream_seed(seed, 2 * layer_idx + (0 if key else 1)), rotation, seed_candidates,
                              seed_criterion if key else "reconstruction")

    return make


@dataclass
class LayerMemory:
    """Bytes held by one layer (or summed over layers).

    Attributes
    ----------
    records : int
        Compressed payload of K and V for the compressed tokens (honest bytes: norms, scales,
        padding included).
    metadata : int
        Fixed per-layer state (outlier channel permutations).
    raw : int
        Uncompressed sinks and recent buffer at the model dtype (whole raw blocks, including those
        mapped ahead for the planned one-token steps).
    decoded : int
        A decoded working copy of compressed tokens (``DecodedCopyCache`` only; 0 here).
    device : int
        Every byte the layer's tensors occupy: record and raw pools at their allocated capacity,
        block tables, channel lists (the decoded copy too, for ``DecodedCopyCache``).
    compressed_tokens, raw_tokens : int
        Tokens in each part, summed over batch rows.
    """

    records: int = 0
    metadata: int = 0
    raw: int = 0
    decoded: int = 0
    device: int = 0
    compressed_tokens: int = 0
    raw_tokens: int = 0

    @property
    def stored(self) -> int:
        """Records + metadata + raw buffers: what the cache must keep."""
        return self.records + self.metadata + self.raw

    def __add__(self, other: LayerMemory) -> LayerMemory:
        return LayerMemory(self.records + other.records, self.metadata + other.metadata,
                           self.raw + other.raw, self.decoded + other.decoded, self.device + other.device,
                           self.compressed_tokens + other.compressed_tokens,
                           self.raw_tokens + other.raw_tokens)


def check_layout(flush_interval: Any, sinks: Any, block_size: Any = DEFAULT_BLOCK) -> tuple[int, int, int]:
    """The caches' integer arguments, checked (``turboquant_codec._validate``'s rules)."""
    return (_validate.integer(flush_interval, "flush_interval", 1), _validate.integer(sinks, "sinks", 0),
            _validate.integer(block_size, "block_size", 1))


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else int(t.numel() * t.element_size())


def check_states(layer: Any, k: Tensor, v: Tensor) -> None:
    """ValueError unless ``k``, ``v`` (B, H, q, d) fit ``layer`` (its heads, head dim, dtype, batch)."""
    for name, t in (("key_states", k), ("value_states", v)):
        _validate.float_dtype(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, kv_heads, tokens, head_dim), got {tuple(t.shape)}")
        if t.shape[1] != layer.num_kv_heads:
            raise ValueError(f"layer {layer.layer_idx}: the model gives {t.shape[1]} KV heads but the "
                             f"cache was built for num_kv_heads={layer.num_kv_heads}")
        if t.shape[3] != layer.head_dim:
            raise ValueError(f"layer {layer.layer_idx}: the model gives head_dim={t.shape[3]} but the "
                             f"cache was built for head_dim={layer.head_dim}")
    if k.shape != v.shape:
        raise ValueError(f"key_states {tuple(k.shape)} and value_states {tuple(v.shape)} differ")
    if layer.is_initialized:
        if k.dtype != layer.dtype:
            raise ValueError(f"layer {layer.layer_idx}: new states have dtype {k.dtype} but the cache "
                             f"holds {layer.dtype} (a cache cannot be reused across models)")
        if k.shape[0] != layer.batch_size:
            raise ValueError(f"layer {layer.layer_idx}: new states have batch {k.shape[0]} but the cache "
                             f"holds batch {layer.batch_size}")


def _index(a: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)


def _refill(dev: dict[str, Any], name: str, values: np.ndarray, device: torch.device) -> bool:
    """Put ``values`` in ``dev[name]``: in place while its shape and dtype hold (True), else as a new
    tensor on ``device`` (False). To a CUDA device the copy leaves from pinned memory without blocking
    the host (torch keeps the pinned block until the copy is done)."""
    new = torch.from_numpy(np.ascontiguousarray(values))
    cuda = device.type == "cuda"
    if cuda:
        new = new.pin_memory()
    kept = dev.get(name)
    if kept is not None and kept.shape == new.shape and kept.dtype == new.dtype:
        kept.copy_(new, non_blocking=cuda)
        return True
    dev[name] = new.to(device, non_blocking=cuda)
    return False


class StepBuffers(NamedTuple):
    """A layer's one-token step buffers (``TurboQuantLayer.run_step``), kept while the new tokens'
    shape and dtype hold."""

    stage: Tensor  # (B, H_q + 2 H, 1, d): the new query, key and value, staged by one launch
    query: Tensor  # (B, H_q, d)
    kv: Tensor  # (2, B, H, d): key and value, scattered into the raw pools by one copy
    out: Tensor  # (B, H_q, d)
    returned: Tensor  # ``out`` as the attention returns it, (B, 1, H_q, d)
    shape: torch.Size  # the new query's
    dtype: torch.dtype


class LengthProtocol:
    """transformers' length queries and reset for a layer that counts ``length`` tokens and clears
    its state with ``_clear`` (shared by ``TurboQuantLayer`` and ``baselines.DecodedCopyLayer``)."""

    length: int
    kq: KVQuantizer
    vq: KVQuantizer

    def _clear(self) -> None:
        raise NotImplementedError

    def get_mask_sizes(self, query_length: Any, *args: Any) -> tuple[int, int]:
        q = int(query_length.shape[0]) if isinstance(query_length, Tensor) else int(query_length)
        return self.length + q, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()
        self.kq.reset()
        self.vq.reset()


class TurboQuantLayer(LengthProtocol, CacheLayerMixin):
    """One attention layer's paged compressed KV (layout in the module docstring).

    Parameters
    ----------
    layer_idx, num_kv_heads, head_dim : int
        What this layer expects; ``update`` refuses other shapes.
    key_quantizer, value_quantizer : KVQuantizer
    flush_interval : int
        ``F``: the buffer is compressed, in whole batches of ``F`` tokens, once it holds ``F`` or more.
    sinks : int
        Leading tokens of each row kept uncompressed.
    block_size : int
        Tokens per block of the record and raw pools.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, layer_idx: int, num_kv_heads: int, head_dim: int, key_quantizer: KVQuantizer,
                 value_quantizer: KVQuantizer, flush_interval: int = DEFAULT_FLUSH,
                 sinks: int = DEFAULT_SINKS, block_size: int = DEFAULT_BLOCK) -> None:
        super().__init__()
        self.layer_idx, self.num_kv_heads, self.head_dim = layer_idx, num_kv_heads, head_dim
        self.kq, self.vq = key_quantizer, value_quantizer
        self.flush_interval, self.sinks, self.block_size = flush_interval, sinks, block_size
        self._plan_rows = min(flush_interval, PLAN_TOKENS)
        # Only TurboQuant records can be read in place by the paged op; other payloads are decoded.
        self.paged = isinstance(key_quantizer, TurboQuantizer) and isinstance(value_quantizer, TurboQuantizer)
        self._clear()

    def _clear(self) -> None:
        self.length = 0
        self.batch_size = 0
        self.on_host = False
        self.n = np.zeros(0, np.int64)
        self.c = np.zeros(0, np.int64)
        self.cap = 0
        self.packed: Tensor | None = None
        self.rec_k: Tensor | None = None
        self.rec_v: Tensor | None = None
        self.raw: Tensor | None = None  # [2, num_raw, bs, H, d]: raw_k and raw_v are its halves
        self.raw_k: Tensor | None = None
        self.raw_v: Tensor | None = None
        self.raw_of = np.full((0, 0), -1, np.int64)
        self.free: list[int] = []
        self.pending: tuple[Tensor, Tensor] | None = None
        self._dev: dict[str, Any] = {}  # device copies of the step metadata, the PagedCache view
        self._next_slot: Tensor | None = None  # raw-pool slot of each row's next token, when fast
        # One-token appends left of the plan (``_plan_fast``): a countdown, so a decode step tests
        # one integer, not the row arrays.
        self._fast_left = 0
        self._has_records = False  # some row holds compressed tokens (``c > sinks``)
        self._seen: tuple[torch.Size, torch.dtype] | None = None  # new states' shape, dtype already checked
        self._staged: tuple[Tensor, Tensor] | None = None  # (new key, its step buffer copy of K and V)
        self._appended = False  # run_step appended the held token on the device; commit only counts it
        self.is_initialized = False
        self.keys = self.values = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        # Steps on the host run NumPy views into the compiled CPU kernel (float16 and float32 on the
        # CPU); bfloat16, which NumPy lacks, takes the device branch.
        self.on_host = self.device.type == "cpu" and self.dtype != torch.bfloat16
        self.batch_size = b = key_states.shape[0]
        self.n = np.zeros(b, np.int64)
        self.c = np.full(b, self.sinks, np.int64)
        self.raw_of = np.full((b, 0), -1, np.int64)
        self.is_initialized = True

    # ------------------------------------------------------------------------------------ update
    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        """Hold the new (B, H, q, d) states for the step; return them, tagged with this layer.

        The registered attention finds the layer through the tag, attends over the stored history
        and the new tokens, then calls ``commit``.
        """
        shape = key_states.shape
        if (shape, key_states.dtype) != self._seen or value_states.shape != shape \
                or value_states.dtype != key_states.dtype:
            check_states(self, key_states, value_states)
            if self.is_initialized:  # before: the batch and dtype are checked against the first states
                self._seen = (shape, key_states.dtype)
        if self.pending is not None:
            raise RuntimeError(NOT_DRIVEN)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        self.length += shape[-2]
        key_states._tq_layer = weakref.ref(self)  # type: ignore[attr-defined]
        return key_states, value_states

    # ------------------------------------------------------------------------------ what attention reads
    def _count_records(self) -> None:
        """``_has_records`` from the rows (after ``c`` changed)."""
        self._has_records = bool(self.rec_k is not None and (self.c > self.sinks).any())

    def can_page(self) -> bool:
        """Whether a one-token step of real tokens can run the paged op (records exist and are
        TurboQuant's)."""
        return self.paged and self._has_records

    def paged_args(self) -> dict[str, Any]:
        """Arguments of ``turboquant_codec.paged_attention`` for a one-token step (all but the new
        tokens, ``scale`` and ``out``), and ``decoder``. On the host (float16/float32) they are
        NumPy views of the tensors, which the codec takes without conversion, and ``decoder`` is the
        op bound to the cache and table (``tq.PagedDecoder``); on the device it is None."""
        dev = self._device_meta()
        if "cache" not in dev:
            kc, vc = self.kq.codec, self.vq.codec  # type: ignore[attr-defined]
            host = self.on_host

            def arr(t: Tensor | None) -> Any:
                if t is None or not host:
                    return t
                # torch's uint16 support is partial: the channel lists go through int32.
                return t.to(torch.int32).numpy().astype(np.uint16) if t.dtype == torch.uint16 else t.numpy()

            dev["cache"] = tq.PagedCache(
                arr(self.rec_k), arr(self.rec_v), kc.config, vc.config,
                arr(kc.channels_on(self.device)) if kc.split else None,
                arr(vc.channels_on(self.device)) if vc.split else None,
                arr(self.raw_k), arr(self.raw_v), arr(dev["rsb"]))
            dev["meta"] = tuple(arr(dev[k]) for k in ("table", "seq", "qsl"))
            # On the host, the op bound to this cache and table: checked here, once per state of
            # the cache (``seq`` is the same buffer, advanced in place by ``_append_fast``).
            dev["decoder"] = tq.PagedDecoder(dev["cache"], dev["meta"][0]) if host else None
        table, seq, qsl = dev["meta"]
        return dict(cache=dev["cache"], block_table=table, seq_lens=seq, query_start_loc=qsl,
                    num_decodes=self.batch_size, decoder=dev["decoder"])

    def run_step(self, query: Tensor, key: Tensor, value: Tensor,
                 attend: Callable[[Tensor, Tensor, Tensor, Tensor], object], tag: Any) -> Tensor:
        """A one-token step on the device: the new tokens into the layer's step buffers, then
        ``attend(q, k, v, out)`` (the paged op on the buffers; ``tag``: whatever else it depends on,
        e.g. its scale).

        The buffers are kept while the shapes hold, so the op sees the same arrays every step and
        replays its prepared launches: query and out ``(B, H_q, d)``, key and value ``(B, H, d)``
        (views of one ``(2, B, H, d)`` buffer, which the append scatters into the raw pools in one
        copy), filled from one staging buffer that takes the new query, key and value in one
        launch. On CUDA, where ``commit`` would take the fast append, the append runs here too, and
        the split of the staged tokens, the op and the append are this layer's ``StepGraph`` (one
        graph launch per step once captured); ``commit`` then only counts the token. The staging
        copy stays outside the graph: the model's new tensors need not come at the same addresses
        from step to step.

        Parameters
        ----------
        query : Tensor (B, H_q, 1, d)
        key, value : Tensor (B, H, 1, d)

        Returns
        -------
        out : Tensor (B, 1, H_q, d)
            A view of the layer's output buffer (overwritten by the next step).
        """
        dev = self._dev
        bufs = dev.get("step")
        if bufs is None or bufs.shape != query.shape or bufs.dtype != query.dtype:
            b, hq, _, d = query.shape
            h = key.shape[1]
            out = query.new_empty(b, hq, d)
            bufs = dev["step"] = StepBuffers(query.new_empty(b, hq + 2 * h, 1, d), torch.empty_like(out),
                                             query.new_empty(2, b, h, d), out, out.unsqueeze(1),
                                             query.shape, query.dtype)
        self._staged = (key, bufs.kv)
        torch.cat((query, key, value), dim=1, out=bufs.stage)
        if self.device.type == "cuda" and self._fast_append_next():
            graph = dev.get("graph")
            if graph is None:
                graph = dev["graph"] = StepGraph()
            state = (dev.get("cache"), self._next_slot, dev["plan"], dev["k"], self.raw, dev.get("seq"),
                     bufs, tag)
            if not graph.replay(state):
                graph(state, functools.partial(self._graph_step, bufs, attend), self.device)
            self._appended = True
        else:
            self._split_and_attend(bufs, attend)
        return bufs.returned

    @staticmethod
    def _split_and_attend(bufs: StepBuffers, attend: Callable[[Tensor, Tensor, Tensor, Tensor], object]
                          ) -> None:
        """The staged new tokens into the op's query and key + value buffers, then the op on them."""
        hq = bufs.query.shape[1]
        bufs.query.copy_(bufs.stage[:, :hq, 0])
        bufs.kv.copy_(bufs.stage[:, hq:, 0].unflatten(1, (2, -1)).transpose(0, 1))
        attend(bufs.query, bufs.kv[0], bufs.kv[1], bufs.out)

    def _graph_step(self, bufs: StepBuffers, attend: Callable[[Tensor, Tensor, Tensor, Tensor], object]
                    ) -> None:
        """What the layer's CUDA graph holds: the split, the op and the fast append."""
        self._split_and_attend(bufs, attend)
        self._append_device(bufs.kv)

    def _device_meta(self) -> dict[str, Any]:
        dev = self._dev
        if "table" not in dev:
            b, cap = self.batch_size, self.cap
            dev["table"] = (torch.arange(b * cap, dtype=torch.int32).view(b, cap)).to(self.device)
            dev["qsl"] = torch.arange(b + 1, dtype=torch.int32).to(self.device)
        for name in ("rsb", "seq"):
            if name not in dev:
                dev[name] = torch.from_numpy(self._meta_values(name)).to(self.device)
                dev.pop("cache", None)
        return dev

    def _meta_values(self, name: str) -> np.ndarray:
        """The host values of step metadata ``name``, int32 as the paged op reads them: ``"rsb"``,
        the raw-block map flat; ``"seq"``, each row's length with the step's new token."""
        return (self.raw_of.reshape(-1) if name == "rsb" else self.n + 1).astype(np.int32)

    def history(self) -> tuple[Tensor, Tensor]:
        """The stored tokens, decoded transiently: (B, H, max n, d) each in the model dtype, row r's
        tokens at ``[0, n[r])`` (zeros after)."""
        b, h, d, bs = self.batch_size, self.num_kv_heads, self.head_dim, self.block_size
        longest = int(self.n.max()) if b else 0
        blocks = -(-longest // bs)
        out = []
        for raw, rec, q in ((self.raw_k, self.rec_k, self.kq), (self.raw_v, self.rec_v, self.vq)):
            full = torch.zeros(b, blocks, bs, h, d, dtype=self.dtype, device=self.device)
            if blocks:
                used = np.arange(blocks)[None, :] * bs < self.n[:, None]
                rows = self.raw_of[:, :blocks]
                is_raw = used & (rows >= 0)
                if is_raw.any():
                    full[torch.from_numpy(is_raw)] = raw[_index(rows[is_raw], self.device)]  # type: ignore[index]
                comp = used & (rows < 0)
                if comp.any():
                    r_idx, j_idx = np.nonzero(comp)
                    phys = _index(r_idx * self.cap + j_idx, self.device)
                    payload = rec[phys]  # type: ignore[index]  # [N, bs, H, P]
                    n_blk = payload.shape[0]
                    vec = q.decode(payload.permute(2, 0, 1, 3).reshape(1, h, n_blk * bs, -1))
                    vec = vec[0].to(self.dtype).view(h, n_blk, bs, d)
                    full[torch.from_numpy(comp)] = vec.permute(1, 2, 0, 3)
            out.append(full.view(b, blocks * bs, h, d)[:, :longest].transpose(1, 2))
        return out[0], out[1]

    # ------------------------------------------------------------------------------------ commit
    def commit(self, real: np.ndarray | None) -> None:
        """Store the held new tokens (those ``real`` marks; all when None) and flush.

        Parameters
        ----------
        real : ndarray [B, q] bool, or None
            Which new tokens are real (not padding), from the attention mask.
        """
        assert self.pending is not None
        key, value = self.pending
        self.pending = None
        staged, self._staged = self._staged, None
        b, h, q, d = key.shape
        if self._appended:
            assert real is None and q == 1
            self._appended = False
            self._advance()
            return
        if real is None and q == 1 and self._fast_append_next():
            # K and V side by side as the step buffers hold them (else stacked here): one scatter.
            self._append_fast(key, value, staged[1] if staged is not None and staged[0] is key else None)
            return
        counts = np.full(b, q, np.int64) if real is None else real.sum(1).astype(np.int64)
        self._commit(key, value, real, counts)

    def _append_fast(self, key: Tensor, value: Tensor, kv: Tensor | None) -> None:
        """One real token per row, at the plan's next slots (raw blocks mapped by ``_plan_fast``), no
        flush (``kv``: the step buffer holding key and value as ``(2, B, H, d)``, or None)."""
        assert self._next_slot is not None and self.raw_k is not None and self.raw_v is not None
        if self.on_host:
            # On the host, through NumPy views of the same memory: each torch call here costs
            # several times the NumPy one, and this runs once per layer and token.
            dev = self._dev
            raw_k, raw_v = self._host_pools()
            slot = self._next_slot.numpy()
            raw_k[slot] = key.detach().numpy()[:, :, 0]
            raw_v[slot] = value.detach().numpy()[:, :, 0]
            k = dev["k"].numpy()
            k += 1
            slot[:] = dev["plan"].numpy()[k[0]]
            if "seq" in dev:
                seq = dev["seq"].numpy()
                seq += 1
        else:
            self._append_device(torch.stack((key[:, :, 0], value[:, :, 0])) if kv is None else kv)
        self._advance()

    def _fast_append_next(self) -> bool:
        """Whether a one-token step of real tokens is a planned fast append (``_append_fast``): it
        goes into a mapped raw block, with no flush."""
        return self._fast_left > 0

    def _append_device(self, kv: Tensor) -> None:
        """The fast append's device work: K and V ``(2, B, H, d)`` into the raw pools at the next
        slots, then the plan's countdown, the slots and the lengths moved on (launches only:
        ``run_step`` captures them)."""
        assert self.raw is not None and self._next_slot is not None
        dev = self._dev
        self.raw.view(2, -1, self.num_kv_heads, self.head_dim).index_copy_(1, self._next_slot, kv)
        dev["k"] += 1
        torch.index_select(dev["plan"], 0, dev["k"], out=self._next_slot.view(1, -1))
        if "seq" in dev:
            dev["seq"] += 1

    def _advance(self) -> None:
        """The fast append's host bookkeeping: one more token per row, and at the plan's end a new
        plan unless a flush is due (the next step then commits in general)."""
        self.n += 1
        self._fast_left -= 1
        if self._fast_left:
            return
        run = self._fast_run(self.n, self.c)
        if run and self._plan_fast(run):
            self._sync("rsb")

    def _fast_run(self, n: np.ndarray, c: np.ndarray) -> int:
        """One-token appends the fast path can take from rows at ``n`` compressed up to ``c``: until
        some row's buffer would reach ``F`` (a general commit flushes it), at most ``P - 1``."""
        if not n.size:
            return 0
        to_flush = int((self.flush_interval - 1 - (n - c)).min())
        return max(min(to_flush, self._plan_rows - 1), 0)

    def _plan_fast(self, run: int) -> bool:
        """Plan ``run`` one-token appends from each row's next position ``n``: give a raw block to
        every position they and the step after them write (that step's block is raw whatever the
        step: it holds the newest token), list each row's slots in ``plan`` (row k: position
        ``n + k``), set the plan's countdown ``k`` to 0 and ``_next_slot`` to row 0. Returns whether
        blocks were given (the raw-block map changed)."""
        b, bs, dev = self.batch_size, self.block_size, self._dev
        self._fast_left = run
        if not b:
            self._next_slot = None
            return False
        pos = self.n + np.arange(run + 1)[:, None]  # [run + 1, B]
        self._ensure_cap(-(-(int(pos.max()) + 1) // bs))
        first, last = self.n // bs, pos[-1] // bs
        opens = [(r, j) for r in range(b) for j in range(first[r], last[r] + 1) if self.raw_of[r, j] < 0]
        self._alloc_raw(opens)
        plan = np.empty((self._plan_rows, b), np.int64)
        plan[: run + 1] = self.raw_of[np.arange(b), pos // bs] * bs + pos % bs
        plan[run + 1 :] = plan[run]  # never read: the plan's end comes first
        _refill(dev, "plan", plan, self.device)
        _refill(dev, "k", np.zeros(1, np.int64), self.device)
        _refill(dev, "slot", plan[0].copy(), self.device)  # a copy: on the CPU it would share ``plan``
        self._next_slot = dev["slot"]
        return bool(opens)

    def _host_pools(self) -> tuple[np.ndarray, np.ndarray]:
        """NumPy views [slots, H, d] of the raw pools (host, float16/float32), kept while the pools
        are the same tensor."""
        assert self.raw is not None
        kept = self._dev.get("pools")
        if kept is None or kept[0] is not self.raw:
            h, d = self.num_kv_heads, self.head_dim
            pools = self.raw.view(2, -1, h, d).numpy()
            kept = self._dev["pools"] = (self.raw, pools[0], pools[1])
        return kept[1], kept[2]

    def _commit(self, key: Tensor, value: Tensor, real: np.ndarray | None, counts: np.ndarray) -> None:
        b, h, q, d = key.shape
        bs, sinks, flush = self.block_size, self.sinks, self.flush_interval
        old_n, new_n = self.n, self.n + counts
        buf = new_n - self.c
        new_c = self.c + np.where(buf >= flush, (buf // flush) * flush, 0)
        # Room for the planned steps' tokens and the one after (the paged op's block table covers
        # seq_lens = n + 1), so that planning does not move the records again.
        run = self._fast_run(new_n, new_c)
        self._ensure_cap(-(-(int(new_n.max()) + run + 1) // bs) if b else 0)
        # New token i of row r is row r * q + i of the flattened new states.
        new_k = key.transpose(1, 2).reshape(b * q, h, d)
        new_v = value.transpose(1, 2).reshape(b * q, h, d)
        cols = [np.arange(q) if real is None else np.flatnonzero(real[r]) for r in range(b)]

        def sources(r: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(is_new, index): new-state row, or raw-pool slot, of row r's positions ``pos``."""
            is_new = pos >= old_n[r]
            idx = np.empty(pos.size, np.int64)
            if is_new.any():
                idx[is_new] = r * q + cols[r][pos[is_new] - old_n[r]]
            old = pos[~is_new]
            idx[~is_new] = self.raw_of[r, old // bs] * bs + old % bs
            return is_new, idx

        def gather(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor]:
            is_new = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, bool)
            idx = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
            out_k = new_k.new_empty(idx.size, h, d)
            out_v = new_v.new_empty(idx.size, h, d)
            sel_new, sel_raw = np.flatnonzero(is_new), np.flatnonzero(~is_new)
            if sel_new.size:
                i, j = _index(sel_new, self.device), _index(idx[sel_new], self.device)
                out_k[i], out_v[i] = new_k[j], new_v[j]
            if sel_raw.size:
                assert self.raw_k is not None and self.raw_v is not None
                i, j = _index(sel_raw, self.device), _index(idx[sel_raw], self.device)
                out_k[i], out_v[i] = self.raw_k.view(-1, h, d)[j], self.raw_v.view(-1, h, d)[j]
            return out_k, out_v

        # 1. Tokens to compress: positions [c, new_c) of each row, rows in order.
        enc_rows = [np.arange(self.c[r], new_c[r]) for r in range(b)]
        enc_pos = [(r, p) for r, p in enumerate(enc_rows) if p.size]
        payload_k = payload_v = None
        if enc_pos:
            vec_k, vec_v = gather([sources(r, p) for r, p in enc_pos])
            xk = vec_k.transpose(0, 1).unsqueeze(0)  # (1, H, T, d)
            xv = vec_v.transpose(0, 1).unsqueeze(0)
            if self.rec_k is None:
                self.kq.calibrate(xk)
                self.vq.calibrate(xv)
            payload_k, payload_v = self.kq.encode(xk), self.vq.encode(xv)  # (1, H, T, P)
            self._ensure_records(payload_k, payload_v)
            pos = np.concatenate([p for _, p in enc_pos])
            row = np.concatenate([np.full(p.size, r) for r, p in enc_pos])
            blk, off = _index(row * self.cap + pos // bs, self.device), _index(pos % bs, self.device)
            assert self.rec_k is not None and self.rec_v is not None
            self.rec_k[blk, off] = payload_k[0].transpose(0, 1).to(self.rec_k.dtype)
            self.rec_v[blk, off] = payload_v[0].transpose(0, 1).to(self.rec_v.dtype)

        # 2. Raw blocks after the step: any sink or buffer position in them.
        writes_src: list[tuple[np.ndarray, np.ndarray]] = []
        writes_at: list[tuple[int, np.ndarray]] = []
        dec_sel: list[np.ndarray] = []  # indices into the compressed batch read back decoded
        dec_at: list[tuple[int, np.ndarray]] = []
        enc_start = 0
        new_raw_blocks: list[tuple[int, int]] = []
        freed: list[tuple[int, int]] = []
        for r in range(b):
            n_blocks = -(-int(new_n[r]) // bs)
            j = np.arange(n_blocks)
            is_raw = (j * bs < sinks) | ((j + 1) * bs > new_c[r])
            have = self.raw_of[r, :n_blocks] >= 0
            new_raw_blocks += [(r, int(x)) for x in np.flatnonzero(is_raw & ~have)]
            freed += [(r, int(x)) for x in np.flatnonzero(~is_raw & have)]
            # New positions in raw blocks that stay raw (sinks or buffer) are copied as given.
            p_new = np.arange(old_n[r], new_n[r])
            keep = is_raw[p_new // bs] & ((p_new < sinks) | (p_new >= new_c[r]))
            if keep.any():
                writes_src.append(sources(r, p_new[keep]))
                writes_at.append((r, p_new[keep]))
            # Compressed positions in raw blocks hold their decoded values.
            p_enc = enc_rows[r]
            back = is_raw[p_enc // bs] if p_enc.size else np.zeros(0, bool)
            if back.any():
                dec_sel.append(enc_start + np.flatnonzero(back))
                dec_at.append((r, p_enc[back]))
            enc_start += p_enc.size
        raw_vals = gather(writes_src) if writes_src else None
        dec_vals = None
        if dec_sel and payload_k is not None and payload_v is not None:
            sel = _index(np.concatenate(dec_sel), self.device)
            dec_vals = tuple(q_.decode(p[:, :, sel])[0].transpose(0, 1).to(self.dtype)
                             for q_, p in ((self.kq, payload_k), (self.vq, payload_v)))
        for rw, blk_j in freed:
            self.free.append(int(self.raw_of[rw, blk_j]))
            self.raw_of[rw, blk_j] = -1
        self._alloc_raw(new_raw_blocks)
        for vals, at in ((raw_vals, writes_at), (dec_vals, dec_at)):
            if vals is None:
                continue
            slots = np.concatenate([self.raw_of[r, p // bs] * bs + p % bs for r, p in at])
            s = _index(slots, self.device)
            assert self.raw_k is not None and self.raw_v is not None
            self.raw_k.view(-1, h, d).index_copy_(0, s, vals[0])
            self.raw_v.view(-1, h, d).index_copy_(0, s, vals[1])

        self.n, self.c = new_n, new_c
        self._count_records()
        self._plan_fast(run)
        self._sync("rsb", "seq")

    def _sync(self, *names: str) -> None:
        """The step metadata ``names`` (``"rsb"``: the raw-block map, ``"seq"``: the lengths) after
        the host arrays changed: rewritten in place on the device while the shapes hold (the paged
        op's kept launches and the step graphs read the same buffers); dropped on the host (its
        decoder checked the values once: a new state gets a new one) or before the op's cache is
        built (``_device_meta`` makes them then)."""
        dev = self._dev
        if self.on_host or "cache" not in dev:
            for name in names:
                dev.pop(name, None)
            return
        for name in names:
            if not _refill(dev, name, self._meta_values(name), self.device):
                dev.pop("cache", None)  # built on the old tensor

    # ---------------------------------------------------------------------------------- storage
    def _ensure_cap(self, blocks: int) -> None:
        """At least ``blocks`` blocks per row (physical ids ``r * cap + j`` move when cap grows)."""
        if blocks <= self.cap:
            return
        # Headroom of one flush interval (at most 64 blocks): records grow about once per flush.
        cap = blocks + min(max(self.flush_interval // self.block_size, 1), 64)
        b = self.batch_size
        raw_of = np.full((b, cap), -1, np.int64)
        raw_of[:, : self.cap] = self.raw_of
        self.raw_of = raw_of
        if self.packed is not None:
            packed = self.packed.new_empty((b, cap, *self.packed.shape[1:]))
            packed[:, : self.cap] = self.packed.view(b, self.cap, *self.packed.shape[1:])
            self._set_records(packed.view(b * cap, *self.packed.shape[1:]))
        elif self.rec_k is not None and self.rec_v is not None:
            recs = []
            for rec in (self.rec_k, self.rec_v):
                new = rec.new_empty((b, cap, *rec.shape[1:]))
                new[:, : self.cap] = rec.view(b, self.cap, *rec.shape[1:])
                recs.append(new.view(b * cap, *rec.shape[1:]))
            self.rec_k, self.rec_v = recs
        self.cap = cap
        self._dev.clear()

    def _set_records(self, packed: Tensor) -> None:
        """``packed`` [B * cap, H, bs, R_k + R_v] and its K / V views [B * cap, bs, H, R]."""
        self.packed = packed
        r_k = self.kq.record_bytes  # type: ignore[attr-defined]
        self.rec_k = packed[..., :r_k].transpose(1, 2)
        self.rec_v = packed[..., r_k:].transpose(1, 2)

    def _set_raw(self, raw: Tensor) -> None:
        """``raw`` [2, num_raw, bs, H, d] and its K / V halves, the pools the paged op reads."""
        self.raw = raw
        self.raw_k, self.raw_v = raw[0], raw[1]

    def _ensure_records(self, payload_k: Tensor, payload_v: Tensor) -> None:
        if self.rec_k is not None:
            return
        nb, bs, h = self.batch_size * self.cap, self.block_size, self.num_kv_heads
        if self.paged:
            r = payload_k.shape[-1] + payload_v.shape[-1]
            self._set_records(torch.empty(nb, h, bs, r, dtype=torch.uint8, device=self.device))
        else:
            self.rec_k = payload_k.new_zeros((nb, bs, h, payload_k.shape[-1]))
            self.rec_v = payload_v.new_zeros((nb, bs, h, payload_v.shape[-1]))

    def _alloc_raw(self, blocks: list[tuple[int, int]]) -> None:
        """Give each (row, block) a raw-pool row, growing the pool when the free list runs out."""
        short = len(blocks) - len(self.free)
        if short > 0:
            have = 0 if self.raw_k is None else self.raw_k.shape[0]
            # Headroom of one block per row: the window grows a block at a time on decode steps.
            size = have + short + self.batch_size
            old = self.raw
            self._set_raw(torch.empty((2, size, self.block_size, self.num_kv_heads, self.head_dim),
                                      dtype=self.dtype, device=self.device))
            if old is not None:
                self.raw[:, :have] = old  # type: ignore[index]
            self.free.extend(range(have, size))
            self._dev.pop("cache", None)
        self.free.sort(reverse=True)  # lowest rows first: pop() from the end
        for r, j in blocks:
            self.raw_of[r, j] = self.free.pop()

    # ---------------------------------------------------------------------------- Cache protocol
    def _select_rows(self, index: Tensor) -> None:
        """Keep / repeat / reorder batch rows: row i becomes old row ``index[i]``."""
        if not self.is_initialized:
            return
        idx = index.detach().to("cpu", torch.int64).numpy()
        b_old, b, cap, bs = self.batch_size, idx.size, self.cap, self.block_size
        t_idx = _index(idx, self.device)
        if self.packed is not None:
            shape = self.packed.shape[1:]
            self._set_records(self.packed.view(b_old, cap, *shape)[t_idx].reshape(b * cap, *shape))
        elif self.rec_k is not None and self.rec_v is not None:
            self.rec_k, self.rec_v = (r.view(b_old, cap, *r.shape[1:])[t_idx].reshape(b * cap, *r.shape[1:])
                                      for r in (self.rec_k, self.rec_v))
        raw_of = self.raw_of[idx]
        src = raw_of[raw_of >= 0]
        if self.raw_k is not None and self.raw_v is not None:
            # A fresh pool in block order, plus the usual headroom.
            gather = _index(src, self.device)
            pad = b
            assert self.raw is not None
            old = self.raw
            self._set_raw(old.new_empty((2, src.size + pad, bs, self.num_kv_heads, self.head_dim)))
            self.raw[:, : src.size] = old[:, gather]
            raw_of[raw_of >= 0] = np.arange(src.size)
            self.free = list(range(src.size, src.size + pad))
        self.raw_of = raw_of
        self.n, self.c = self.n[idx], self.c[idx]
        self._count_records()
        self.batch_size = b
        self._dev.clear()
        self._next_slot, self._fast_left, self._seen = None, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(torch.arange(self.batch_size)[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("TurboQuantCache cannot be cropped: compressed tokens cannot be restored exactly")

    def offload(self) -> None:  # records are small; offloading is not supported
        pass

    def prefetch(self) -> None:
        pass

    # ------------------------------------------------------------------------------------ memory
    def memory(self) -> LayerMemory:
        """Bytes held by this layer (see ``LayerMemory``)."""
        comp = int(np.clip(self.c - self.sinks, 0, None).sum()) if self.batch_size else 0
        comp = min(comp, int(self.n.sum())) if self.batch_size else 0
        h, bs = self.num_kv_heads, self.block_size
        records = 0
        if self.rec_k is not None and self.rec_v is not None:
            per = (self.rec_k.shape[-1] * self.rec_k.element_size()
                   + self.rec_v.shape[-1] * self.rec_v.element_size())
            if self.paged:
                records = comp * h * per
            else:
                # Baselines store a working payload; count the bytes their real format needs.
                k1, v1 = self.rec_k[:1, :1], self.rec_v[:1, :1]
                records = comp * (self.kq.stored_nbytes(k1) + self.vq.stored_nbytes(v1))
        raw_rows = int((self.raw_of >= 0).sum())
        elem = torch.finfo(self.dtype).bits // 8 if self.is_initialized else 0
        meta = self.kq.metadata_nbytes() + self.vq.metadata_nbytes()
        # The step metadata (``_next_slot`` among it), not the views; then the step buffers.
        tensors = [t for t in self._dev.values() if isinstance(t, Tensor)]
        dev = sum(_nbytes(t) for t in (self.packed, self.raw, *tensors))
        bufs = self._dev.get("step")
        if bufs is not None:
            dev += sum(_nbytes(t) for t in (bufs.stage, bufs.query, bufs.kv, bufs.out))
        if self.packed is None:
            dev += _nbytes(self.rec_k) + _nbytes(self.rec_v)
        return LayerMemory(
            records=records,
            metadata=meta,
            raw=raw_rows * bs * h * self.head_dim * elem * 2,
            device=dev + meta,
            compressed_tokens=comp,
            raw_tokens=int(self.n.sum()) - comp if self.batch_size else 0,
        )


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _model_shape(config: Any) -> tuple[int, int, int, list[str]]:
    """(num_layers, num_kv_heads, head_dim, layer types) of a decoder config."""
    text = _text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layers = int(text.num_hidden_layers)
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
    others = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if others:
        raise ValueError(f"TurboQuantCache serves full-attention layers (and keeps sliding-window ones "
                         f"uncompressed); the config also has {others}")
    return layers, int(kv_heads), int(head_dim), types


class TurboQuantCache(Cache):
    """transformers ``Cache`` holding the KV history as paged TurboQuant records (plus raw sinks and
    recent window), read in place by the registered attention (``hf_attention``).

    Parameters
    ----------
    config : PretrainedConfig
        The model's config: fixes the number of layers, KV heads and head dim the cache accepts.
        Sliding-window layers get transformers' own ``DynamicSlidingWindowLayer``.
    key_bits, value_bits : float
        Nominal code bits per channel (halves quantize half the channels, the outliers, a bit finer);
        by default 4 and 3, 3.5 bits per value (``DEFAULT_KEY_BITS``: why).
    key_mode, value_mode : {"mse", "prod"}
        TurboQuant_mse or TurboQuant_prod (QJL). MSE keys measured better for attention
        (docs/eval-smollm2.md).
    flush_interval : int
        The flush batch: recent tokens are kept raw until ``F`` have gathered, then compressed
        together (``F`` in the module docstring). Not the vLLM plugin's ``raw_window``
        (``TQ_RAW_WINDOW``), which keeps the latest tokens raw as a sliding window.
    sinks : int
        Leading tokens of each row kept uncompressed (attention sinks).
    seed : int
        Base seed; layer ``i`` uses ``stream_seed(seed, 2 i)`` (K) and ``stream_seed(seed, 2 i + 1)`` (V).
    rotation : {"haar", "hadamard2", "hadamard"}
        Rotation kind of every stream (``turboquant_codec.CodecConfig``).
    seed_candidates : int
        Seeds each stream tries at its first flush, keeping the one whose records serve those tokens
        best (``TurboQuantizer``); 1 keeps the base stream seed.
    seed_criterion : {"reconstruction", "scores", "attention"}
        What "best" means for key streams (``calibration_error``); value streams always take
        reconstruction.
    block_size : int
        Tokens per block of the record and raw pools (16: what the fused CUDA kernel reads).
    quantizer : callable, optional
        ``quantizer(kind, layer_idx, head_dim) -> KVQuantizer`` replacing TurboQuant (``baselines``);
        the bits/mode/seed arguments are then unused and every step reads the history decoded.

    Examples
    --------
    >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="turboquant")  # doctest: +SKIP
    >>> cache = TurboQuantCache(model.config)                         # doctest: +SKIP
    >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
    >>> cache.memory().device                                          # doctest: +SKIP
    """

    def __init__(self, config: Any, *, key_bits: float = DEFAULT_KEY_BITS,
                 value_bits: float = DEFAULT_VALUE_BITS,
                 key_mode: str = DEFAULT_MODE, value_mode: str = DEFAULT_MODE,
                 flush_interval: int = DEFAULT_FLUSH, sinks: int = DEFAULT_SINKS, seed: int = 0,
                 block_size: int = DEFAULT_BLOCK, quantizer: QuantizerFactory | None = None,
                 rotation: str = DEFAULT_ROTATION, seed_candidates: int = DEFAULT_SEED_CANDIDATES,
                 seed_criterion: str = DEFAULT_SEED_CRITERION) -> None:
        from transformers.cache_utils import DynamicSlidingWindowLayer

        from . import hf_attention  # noqa: F401  (registers the "turboquant" attention)

        flush_interval, sinks, block_size = check_layout(flush_interval, sinks, block_size)
        num_layers, kv_heads, head_dim, types = _model_shape(config)
        make = quantizer or turboquant_factory(key_bits, value_bits, key_mode, value_mode, seed, rotation,
                                               seed_candidates, seed_criterion)
        layers: list[Any] = []
        for i, kind in enumerate(types[:num_layers]):
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=_text_config(config).sliding_window))
            else:
                layers.append(TurboQuantLayer(i, kv_heads, head_dim, make("key", i, head_dim),
                                              make("value", i, head_dim), flush_interval, sinks, block_size))
        super().__init__(layers=layers)
        self.num_kv_heads, self.head_dim = kv_heads, head_dim
        self.mask_memo: dict[str, Any] = {}  # the step's mask, read once for all layers
        self._model_config: Any = None  # the config ``check_model`` last accepted
        self._first_compressed = next((x for x in layers if isinstance(x, TurboQuantLayer)), None)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"the model asks for layer {layer_idx} but the cache was built for "
                             f"{len(self.layers)} layers (a cache cannot be reused across models)")
        layer = self.layers[layer_idx]
        if layer is self._first_compressed and layer.pending is None:
            # A new step: the previous ones must have reached every layer (a held step is
            # refused by the layer's own update, more precisely).
            check_states(layer, key_states, value_states)
            self._check_every_layer_driven()
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if isinstance(layer, TurboQuantLayer):
            keys._tq_cache = weakref.ref(self)  # type: ignore[attr-defined]
        return keys, values

    def _check_every_layer_driven(self) -> None:
        """ValueError unless the previous steps reached every compressed layer (a model with fewer
        layers than the cache's config leaves the others behind; a direct ``update`` of one layer
        per step does too)."""
        lengths = [layer.length for layer in self.layers if isinstance(layer, TurboQuantLayer)]
        if lengths and min(lengths) != max(lengths):
            behind = [i for i, layer in enumerate(self.layers)
                      if isinstance(layer, TurboQuantLayer) and layer.length != lengths[0]]
            raise ValueError(f"the cache's layers {behind} missed earlier steps that layer 0 saw: the model "
                             f"has fewer layers than the {len(self.layers)} the cache was built for (a cache "
                             f"cannot be reused across models)")

    def check_model(self, config: Any) -> None:
        """ValueError when the model (``config``) has fewer layers than the cache was built for
        (more are refused by ``update``); checked once per config object."""
        if self._model_config is config:
            return
        layers = _model_shape(config)[0]
        if layers < len(self.layers):
            raise ValueError(f"the model has {layers} layers but the cache was built for {len(self.layers)} "
                             f"(a cache cannot be reused across models)")
        self._model_config = config

    def memory(self) -> LayerMemory:
        """Bytes held by the compressed layers (``LayerMemory``; token counts summed over layers
        and rows). Sliding-window layers are not included."""
        total = LayerMemory()
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                total = total + layer.memory()
        return total
