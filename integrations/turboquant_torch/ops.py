"""The TurboQuant codec as ``torch.library`` custom ops (namespace ``turboquant``).

Tensors owned here (``R = CodecConfig(d, bits, mode, seed).record_bytes``)::

    x         (*lead, n, d)       float16 / bfloat16 / float32   vectors to encode
    records   (*lead, n, R)       uint8                          one byte record per vector
    channels  (*lead, d)          uint16                         per stream: outlier channels first;
              (*lead, 0)          uint16                         when bits are an integer (no split)

Ops ``turboquant::encode``, ``decode``, ``scores``, ``attention``: their signatures, mutated
arguments and result shapes are declared in ``turboquant_codec._ops.SPECS`` (rendered in that
module's docstring) and ``_opgen`` generates the custom ops and their fakes from them; this module
writes each op's body and argument checks. Configurations travel as plain ``bits, mode, seed,
rotation`` (seeds as their two's-complement int64: ``seed_arg``).

CPU tensors run the NumPy reference backend on zero-copy NumPy views (bfloat16, which NumPy lacks,
through float32); CUDA tensors run ``turboquant_codec`` with ``backend="auto"`` (the GPU backends,
zero-copy through DLPack / ``__cuda_array_interface__``). Results land on the input's device. No
codec maths here: every op is a call into ``turboquant_codec``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

import turboquant_codec as tq
from turboquant_codec import _validate
from turboquant_codec._opspec import wire_config, wire_seed
from turboquant_codec.config import CodecConfig

from ._opgen import Call, define

CHANNEL_DTYPE = torch.uint16


# ------------------------------------------------------------------------------------------ helpers
# Seeds cross the op boundary as int64 two's complement: the contract's one convention, re-exported.
seed_arg = wire_seed
make_config = wire_config


def check_float(x: Tensor, name: str) -> None:
    """ValueError unless ``x`` is a float16/bfloat16/float32 tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _validate.float_dtype(x, name)


def _same_device(a: Call, *names: str) -> None:
    """ValueError unless the tensors of ``a`` named (those given) share one device."""
    present = [(n, getattr(a, n)) for n in names if getattr(a, n) is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{first_name} is on {first.device} but {name} is on {t.device}")


def _channels_in(channels: Tensor | None, cfg: CodecConfig) -> Tensor | None:
    """The permutation to hand the codec: None for integer bits (an empty tensor means none too)."""
    if channels is None or channels.numel() == 0:
        return None
    if not cfg.split:
        raise ValueError(f"channels were given but bits={cfg.bits:g} has no channel split")
    return channels


def _host(x: Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor; bfloat16 and uint16 through a converted copy."""
    x = x.detach()
    if x.dtype == torch.bfloat16:
        x = x.float()
    elif x.dtype == CHANNEL_DTYPE:
        # torch's uint16 support is partial; int32 is exact for indices < 1024.
        x = x.to(torch.int32)
    return x.numpy()


def _gpu(t: Tensor | None) -> Tensor | None:
    """A CUDA input as the GPU backends take it (C-contiguous; a no-op when it already is)."""
    return None if t is None else t.contiguous()


def _encoded(records: Tensor, channels: Tensor | None, cfg: CodecConfig) -> tq.Encoded:
    if records.is_cuda:
        return tq.Encoded(records=_gpu(records), channels=_gpu(channels), config=cfg)
    return tq.Encoded(
        records=records.detach().numpy(),
        channels=None if channels is None else _host(channels),
        config=cfg,
    )


def _torch(result: object, device: torch.device) -> Tensor:
    """A codec result (NumPy array on CPU, torch tensor on CUDA) as a fresh-enough torch tensor."""
    if isinstance(result, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(result)).to(device)
    assert isinstance(result, Tensor)
    return result


def _backend(t: Tensor) -> str:
    # CPU: always the NumPy reference (TQ_BACKEND may name a GPU backend for CUDA data).
    return "auto" if t.is_cuda else "numpy"


# -------------------------------------------------------------------------------------------- encode
def _encode(a: Call) -> tuple[Tensor, Tensor]:
    x, cfg = a.x, a.cfg[""]
    ch = _channels_in(a.channels, cfg)
    if x.is_cuda:
        enc = tq.encode(_gpu(x), bits=cfg.bits, mode=cfg.mode, seed=cfg.seed, channels=_gpu(ch),
                        backend="auto", check_finite=a.check_finite, rotation=cfg.rotation)
    else:
        enc = tq.encode(_host(x), bits=cfg.bits, mode=cfg.mode, seed=cfg.seed,
                        channels=None if ch is None else _host(ch), backend="numpy",
                        check_finite=a.check_finite, rotation=cfg.rotation)
    records = _torch(enc.records, x.device)
    if not cfg.split:
        out_channels = x.new_empty(tuple(x.shape[:-2]) + (0,), dtype=CHANNEL_DTYPE)
    elif ch is not None:
        # The codec hands the given permutation back; a custom op must not alias its inputs.
        out_channels = ch.to(CHANNEL_DTYPE, copy=True)
    else:
        out_channels = _torch(enc.channels, x.device).to(CHANNEL_DTYPE)
    return records, out_channels


def _check_encode(a: Call) -> None:
    shape = _validate.float_array(a.x, "x", 2)
    ch = _channels_in(a.channels, a.cfg[""])
    if ch is not None:
        _validate.given_channels(ch, shape[:-2], a.cfg[""])


define("encode", _encode, _check_encode)


def encode(
    x: Tensor,
    *,
    bits: float = 3.5,
    mode: str = "mse",
    seed: int = 0,
    channels: Tensor | None = None,
    check_finite: bool = True,
    rotation: str = "haar",
) -> tuple[Tensor, Tensor | None]:
    """Compress vectors (``turboquant::encode``).

    Parameters
    ----------
    x : Tensor, shape (*lead, n, d), float16/bfloat16/float32, CPU or CUDA
    bits, mode, seed, rotation
        As ``turboquant_codec.encode``.
    channels : Tensor, shape (*lead, d), optional
        Fixed outlier-channel permutation (half-integer bits only); chosen from ``x`` when omitted.
    check_finite : bool
        Reject NaN/Inf (a device synchronisation on CUDA).

    Returns
    -------
    records : Tensor, shape (*lead, n, R), uint8
    channels : Tensor, shape (*lead, d), uint16, or None for integer bits
    """
    check_float(x, "x")
    bits, seed = _validate.real(bits, "bits"), seed_arg(seed)
    records, out = torch.ops.turboquant.encode(x, channels, bits, mode, seed, check_finite, rotation)
    return records, (out if make_config(x.shape[-1], bits, mode, seed, rotation).split else None)


# -------------------------------------------------------------------------------------------- decode
def _decode(a: Call) -> Tensor:
    cfg = a.cfg[""]
    _validate.record_array(a.records, cfg, "records")
    enc = _encoded(a.records, _channels_in(a.channels, cfg), cfg)
    return _torch(tq.decode(enc, backend=_backend(a.records)), a.records.device)


def _check_decode(a: Call) -> None:
    _validate.encoded_arrays(a.records, _channels_in(a.channels, a.cfg[""]), a.cfg[""])


define("decode", _decode, _check_decode)


def decode(
    records: Tensor, channels: Tensor | None, *, d: int, bits: float = 3.5, mode: str = "mse",
    seed: int = 0, rotation: str = "haar",
) -> Tensor:
    """Reconstruct vectors (``turboquant::decode``).

    Parameters
    ----------
    records : Tensor, shape (*lead, n, R), uint8
    channels : Tensor, shape (*lead, d), or None for integer bits
    d, bits, mode, seed, rotation
        The configuration the records were encoded with.

    Returns
    -------
    Tensor, shape (*lead, n, d), float32, on the device of ``records``
    """
    return torch.ops.turboquant.decode(records, channels, _validate.integer(d, "d"),
                                       _validate.real(bits, "bits"), mode, seed_arg(seed), rotation)


# -------------------------------------------------------------------------------------------- scores
def _scores(a: Call) -> Tensor:
    q, cfg = a.q, a.cfg[""]
    _validate.record_array(a.records, cfg, "records")
    _same_device(a, "q", "records", "channels")
    enc = _encoded(a.records, _channels_in(a.channels, cfg), cfg)
    query = _gpu(q) if q.is_cuda else _host(q)
    return _torch(tq.scores(query, enc, backend=_backend(q)), q.device)


def _check_scores(a: Call) -> None:
    check_float(a.q, "q")
    cfg = a.cfg[""]
    _validate.encoded_arrays(a.records, _channels_in(a.channels, cfg), cfg)
    _validate.scores_inputs(a.q, tuple(a.records.shape[:-1]) + (cfg.d,))
    _same_device(a, "q", "records", "channels")


define("scores", _scores, _check_scores)


def scores(
    q: Tensor, records: Tensor, channels: Tensor | None, *, bits: float = 3.5, mode: str = "mse",
    seed: int = 0, rotation: str = "haar",
) -> Tensor:
    """Estimated inner products of queries with encoded keys (``turboquant::scores``).

    Parameters
    ----------
    q : Tensor, shape (*lead, m, d), float16/bfloat16/float32
    records : Tensor, shape (*lead, n, R), uint8
    channels : Tensor, shape (*lead, d), or None for integer bits

    Returns
    -------
    Tensor, shape (*lead, m, n), float32
    """
    check_float(q, "q")
    return torch.ops.turboquant.scores(q, records, channels, _validate.real(bits, "bits"), mode,
                                       seed_arg(seed), rotation)


# ----------------------------------------------------------------------------------------- attention
_ATTENTION_TENSORS = ("q", "k_records", "v_records", "k_tail", "v_tail")


def _stream(a: Call, kv: str) -> tuple[Tensor, Tensor | None]:
    """The records and the channels to hand the codec of stream ``kv`` ("k" or "v")."""
    return getattr(a, f"{kv}_records"), _channels_in(getattr(a, f"{kv}_channels"), a.cfg[kv])


def _attention(a: Call) -> Tensor:
    q = a.q
    for kv in "kv":
        _validate.record_array(getattr(a, f"{kv}_records"), a.cfg[kv], f"{kv}_records")
    _same_device(a, *_ATTENTION_TENSORS)
    k_enc, v_enc = (_encoded(*_stream(a, kv), a.cfg[kv]) for kv in "kv")
    if q.is_cuda:
        # No finiteness check on the GPU: it would synchronise (and break CUDA-graph capture); a
        # non-finite query gives non-finite outputs, as with SDPA.
        out = tq.attention(_gpu(q), k_enc, v_enc, scale=a.scale, k_tail=_gpu(a.k_tail),
                           v_tail=_gpu(a.v_tail), backend="auto", check_finite=False)
    else:
        tails = [None if t is None else _host(t) for t in (a.k_tail, a.v_tail)]
        out = tq.attention(_host(q), k_enc, v_enc, scale=a.scale, k_tail=tails[0], v_tail=tails[1],
                           backend="numpy")
    return _torch(out, q.device)


def _check_attention(a: Call) -> None:
    check_float(a.q, "q")
    shapes = []
    for kv in "kv":
        (records, channels), cfg = _stream(a, kv), a.cfg[kv]
        _validate.record_array(records, cfg, f"{kv}_records")
        _validate.encoded_arrays(records, channels, cfg)
        shapes.append(tuple(records.shape[:-1]) + (cfg.d,))
    _validate.attention_inputs(a.q, shapes[0], shapes[1], a.k_tail, a.v_tail)
    _validate.positive_finite(a.scale, "scale")
    _same_device(a, *_ATTENTION_TENSORS)


define("attention", _attention, _check_attention)


def attention(
    q: Tensor,
    k_records: Tensor,
    k_channels: Tensor | None,
    v_records: Tensor,
    v_channels: Tensor | None,
    *,
    k_codec: TorchCodec,
    v_codec: TorchCodec,
    scale: float,
    k_tail: Tensor | None = None,
    v_tail: Tensor | None = None,
) -> Tensor:
    """Decode attention over compressed K/V plus an optional raw tail (``turboquant::attention``).

    Parameters
    ----------
    q : Tensor, shape (*lead, h_q, d)
    k_records, v_records : Tensor, shape (*lead, h_kv, n, R_k / R_v), uint8
    k_channels, v_channels : Tensor, shape (*lead, h_kv, d), or None for integer bits
    k_codec, v_codec : TorchCodec
        Configurations (their ``channels`` are not used: pass the permutations explicitly).
    scale : float
    k_tail, v_tail : Tensor, shape (*lead, h_kv, t, d), optional

    Returns
    -------
    Tensor, shape (*lead, h_q, d), float32
    """
    check_float(q, "q")
    return torch.ops.turboquant.attention(
        q, k_records, k_channels, v_records, v_channels,
        k_codec.bits, k_codec.mode, seed_arg(k_codec.seed),
        v_codec.bits, v_codec.mode, seed_arg(v_codec.seed),
        _validate.positive_finite(scale, "scale"), k_tail, v_tail, k_codec.rotation, v_codec.rotation,
    )


# ---------------------------------------------------------------------------------------- TorchCodec
@dataclass
class TorchCodec:
    """One codec configuration with its fixed per-stream channel permutation.

    Parameters
    ----------
    d : int
        Head dimension.
    bits, mode, seed
        As ``turboquant_codec.encode``; derive per-layer, per-K/V seeds with
        ``turboquant_codec.stream_seed``.
    channels : Tensor, shape (*streams, d), uint16, optional
        Outlier-channel permutation of each stream (e.g. each KV head), half-integer bits only.
        When None, the first ``encode`` (or ``calibrate``) fixes it from its input and keeps it, so
        every later record of a stream uses the same channel split.
    check_finite : bool
        Reject NaN/Inf on encode (a synchronisation on CUDA).
    rotation : {"haar", "hadamard2", "hadamard"}
        As ``turboquant_codec.encode``.

    Notes
    -----
    One codec may be shared by threads: the first choice of the permutation (``encode``,
    ``keep_first_channels``) happens once, under a lock, and every thread encodes with it.
    """

    d: int
    bits: float = 3.5
    mode: str = "mse"
    seed: int = 0
    channels: Tensor | None = None
    check_finite: bool = True
    _on_device: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)
    _first: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    rotation: str = "haar"

    def __post_init__(self) -> None:
        self.seed = _validate.seed(self.seed)
        self.config = make_config(self.d, self.bits, self.mode, self.seed, self.rotation)
        self.d, self.bits = self.config.d, self.config.bits
        if self.channels is not None:
            given, self.channels = self.channels, None
            self.set_channels(given)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        del state["_first"]  # a lock is not copied: a copy gets its own
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state, _first=threading.Lock())

    @property
    def record_bytes(self) -> int:
        """Bytes of one encoded vector."""
        return self.config.record_bytes

    @property
    def split(self) -> bool:
        return self.config.split

    def set_channels(self, channels: Tensor) -> None:
        """Fix the permutation (*streams, d); validates it is one permutation per stream."""
        if not self.split:
            raise ValueError(f"bits={self.bits:g} has no channel split: channels must stay None")
        if channels.shape[-1] != self.d:
            raise ValueError(f"channels have last dimension {channels.shape[-1]} but d={self.d}")
        sorted_ = torch.sort(channels.to(torch.int64), dim=-1).values
        if not torch.equal(sorted_, torch.arange(self.d, device=channels.device).expand_as(sorted_)):
            raise ValueError("channels must hold a permutation of range(d) per stream")
        if self.channels is not None and self.channels.shape == channels.shape:
            # In place, on every device copy too: a CUDA graph captured with the old permutation's
            # tensors reads the new one on replay.
            self.channels.copy_(channels)
            for copy in self._on_device.values():
                copy.copy_(channels)
            return
        self.channels = channels.to(CHANNEL_DTYPE)
        self._on_device = {}

    def channels_on(self, device: torch.device) -> Tensor | None:
        """The permutation on ``device`` (copied once per device), or None."""
        if self.channels is None:
            return None
        if self.channels.device == device:
            return self.channels
        if device not in self._on_device:
            self._on_device[device] = self.channels.to(device)
        return self._on_device[device]

    def choose_channels(self, x: Tensor) -> Tensor | None:
        """The permutation calibration vectors ``x`` (*streams, n, d) would fix (largest mean
        square per stream), without fixing it; None for integer bits."""
        if not self.split:
            return None
        return encode(x, bits=self.bits, mode=self.mode, seed=self.seed, check_finite=self.check_finite,
                      rotation=self.rotation)[1]

    def calibrate(self, x: Tensor) -> None:
        """Fix the permutation from calibration vectors ``x`` (*streams, n, d), replacing any."""
        channels = self.choose_channels(x)
        if channels is not None:
            with self._first:
                self.set_channels(channels)

    def keep_first_channels(self, channels: Tensor) -> bool:
        """Fix ``channels`` unless a permutation is already set (atomically); whether it was kept."""
        with self._first:
            if self.channels is not None:
                return False
            self.set_channels(channels)
            return True

    def encode(self, x: Tensor) -> Tensor:
        """Records (*streams, n, R) of ``x`` (*streams, n, d); fixes the permutation on first use."""
        if self.split and self.channels is None:
            with self._first:
                if self.channels is None:
                    records, channels = encode(x, bits=self.bits, mode=self.mode, seed=self.seed,
                                               check_finite=self.check_finite, rotation=self.rotation)
                    assert channels is not None
                    self.set_channels(channels)
                    return records
        return encode(x, bits=self.bits, mode=self.mode, seed=self.seed, channels=self.channels_on(x.device),
                      check_finite=self.check_finite, rotation=self.rotation)[0]

    def decode(self, records: Tensor) -> Tensor:
        """Vectors (*streams, n, d) float32 of ``records`` (*streams, n, R)."""
        return decode(records, self.channels_on(records.device), d=self.d, bits=self.bits,
                      mode=self.mode, seed=self.seed, rotation=self.rotation)
