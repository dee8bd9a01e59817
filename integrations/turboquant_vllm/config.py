"""``TurboQuantConfig``: the plugin's configuration, read from ``TQ_*`` environment variables.

Every process vLLM starts (API server, engine core, workers) reads the same environment, so the
configuration is identical everywhere. ``DEFAULTS`` is the one place the defaults live, and this
module the one place the plugin reads its variables (``marker_file`` and ``platform_disabled`` for
the two read outside ``TurboQuantConfig``). The codec's own variable, ``TQ_BACKEND``, is read by
``turboquant_codec.tuning``; the plugin passes its choice (``TQ_CODEC_BACKEND``) as an argument.

Variables (names of the original plugin first; all optional):

==================  =========================================================================
TQ_B_MSE            bits per value of the MSE quantizer, keys and values (default 3.5)
TQ_B_QJL            0 or 1; 1 = QJL ("prod") keys at TQ_B_MSE + 1 bits, as the original (default 0)
TQ_K_BITS           key bits (overrides TQ_B_MSE / TQ_B_QJL for keys)
TQ_V_BITS           value bits (overrides TQ_B_MSE for values)
TQ_K_MODE           mse | prod for keys (default mse; prod when TQ_B_QJL=1)
TQ_V_MODE           mse | prod for values (default mse)
TQ_RAW_WINDOW       recent tokens of each running sequence read uncompressed (default 128;
                    0 = quantize on write). TQ_FLUSH_INTERVAL, the original plugin's name, is
                    still read (with a deprecation warning) when TQ_RAW_WINDOW is unset
TQ_SINK_TOKENS      first tokens of each sequence read uncompressed (default 4; their block)
TQ_SEED             base seed of the rotations (default 0)
TQ_ROTATION         haar | hadamard2 | hadamard: rotation kind of every stream (default haar;
                    the Hadamard kinds need power-of-two channel groups). No per-stream seed
                    choice here (``TurboQuantCache(seed_candidates=)`` has it): CUDA graphs
                    captured before the first real write hold each layer's tables, and measured
                    on SmolLM2 the choice did not lower the KL (docs/quality-seeds.md)
TQ_CODEC_BACKEND    codec backend for CUDA tensors: auto or a turboquant_codec backend name
TQ_RAW_SEQS         running sequences the raw side pool is sized for (default: max_num_seqs;
                    0 = no raw pool); capped by TQ_RAW_SHARE
TQ_RAW_SHARE        most of the KV-cache budget the raw side pool may take, in [0, 1) (default
                    0.1); sequences beyond the pool read their recent tokens compressed
TQ_NUM_LAYERS, TQ_NUM_HEADS, TQ_NUM_KV_HEADS, TQ_HEAD_DIM, TQ_MAX_SEQ_LEN, TQ_DEVICE
                    checks only: detected from vLLM's config; a different value is an error
TQ_MARKER_FILE      evidence file: each process appends a JSON line when the backend runs
TQ_DISABLE_PLATFORM 1 = the CPU platform plugin stands aside (vLLM's own CPU platform is used)
==================  =========================================================================
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from turboquant_codec.config import ROTATIONS, CodecConfig

#: The defaults, in one place (MSE keys measured best: docs/eval-smollm2.md, docs/calibration.md).
DEFAULTS: dict[str, object] = {
    "b_mse": 3.5,
    "b_qjl": 0,
    "k_mode": "mse",
    "v_mode": "mse",
    "raw_window": 128,
    "sink_tokens": 4,
    "seed": 0,
    "rotation": "haar",
    "codec_backend": "auto",
    # A tenth of the budget keeps the compressed pool at >= 0.9x its full size (3.6x stock's tokens at
    # 3.5 bits) and covers 7 sequences of SmolLM2-135M in 256 MiB (3.5 MiB per sequence: README).
    "raw_share": 0.1,
}

ENV_PREFIX = "TQ_"
#: Every variable the plugin reads (unknown TQ_* names are left alone: the codec reads TQ_BACKEND).
ENV_VARS = (
    "TQ_B_MSE", "TQ_B_QJL", "TQ_K_BITS", "TQ_V_BITS", "TQ_K_MODE", "TQ_V_MODE", "TQ_RAW_WINDOW",
    "TQ_FLUSH_INTERVAL", "TQ_SINK_TOKENS", "TQ_SEED", "TQ_ROTATION", "TQ_CODEC_BACKEND", "TQ_RAW_SEQS",
    "TQ_RAW_SHARE", "TQ_NUM_LAYERS", "TQ_NUM_HEADS", "TQ_NUM_KV_HEADS", "TQ_HEAD_DIM", "TQ_MAX_SEQ_LEN",
    "TQ_DEVICE", "TQ_MARKER_FILE", "TQ_DISABLE_PLATFORM",
)
#: Old names still read: old -> new (a deprecation warning names both).
DEPRECATED_VARS = {"TQ_FLUSH_INTERVAL": "TQ_RAW_WINDOW"}
logger = logging.getLogger("vllm.turboquant_vllm")
_SHAPE_FIELDS = (
    ("num_layers", "TQ_NUM_LAYERS"), ("num_heads", "TQ_NUM_HEADS"), ("num_kv_heads", "TQ_NUM_KV_HEADS"),
    ("head_dim", "TQ_HEAD_DIM"), ("max_seq_len", "TQ_MAX_SEQ_LEN"),
)


class ConfigError(ValueError):
    """An invalid TQ_* value; the message names the variable."""


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = _get(env, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str) -> float | None:
    raw = _get(env, name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of bits such as 3.5") from None


def _mode(env: Mapping[str, str], name: str) -> str | None:
    raw = _get(env, name)
    if raw is None:
        return None
    if raw.lower() not in ("mse", "prod"):
        raise ConfigError(f"{name}={raw!r}: expected 'mse' or 'prod'")
    return raw.lower()


@dataclass(frozen=True)
class TurboQuantConfig:
    """Configuration of the TurboQuant KV cache.

    Parameters
    ----------
    k_bits, v_bits : float
        Nominal bits per value of keys and values (norms are extra; see ``record_bytes``).
    k_mode, v_mode : {"mse", "prod"}
    raw_window : int
        The most recent ``raw_window`` tokens of every running sequence are attended uncompressed
        (raw side pool); 0 quantizes on write. (The HF cache's ``flush_interval`` is another thing:
        how many new tokens it compresses together.)
    sink_tokens : int
        The first ``sink_tokens`` tokens (their whole block in vLLM) are attended uncompressed.
    seed : int
        Base seed; layer ``i`` uses ``stream_seed(seed, 2 i)`` for K and ``2 i + 1`` for V.
    rotation : {"haar", "hadamard2", "hadamard"}
        Rotation kind of every layer's K and V codec (``turboquant_codec.CodecConfig``).
    codec_backend : str
        ``"auto"`` or a ``turboquant_codec`` backend name, for CUDA tensors (CPU runs NumPy).
    raw_seqs : int or None
        Sequences the raw pool is sized for (None: vLLM's ``max_num_seqs``), capped by ``raw_share``.
    raw_share : float
        Most of the KV-cache budget the raw pool may take, in [0, 1): the pool holds whole sequences'
        windows, as many as fit; later sequences get no raw window (their recent tokens are read
        compressed) instead of the engine refusing to start.
    num_layers, num_heads, num_kv_heads, head_dim, max_seq_len : int or None
        Model shape; None = detect. Set values are checked against the model (``validate``).
    device : str or None
        "cpu" or "cuda"; None = vLLM's device. Checked like the shape.
    b_mse, b_qjl : float, int
        The original plugin's knobs, kept for reference (``from_env`` derives the bits from them).
    """

    k_bits: float = float(DEFAULTS["b_mse"])  # type: ignore[arg-type]
    v_bits: float = float(DEFAULTS["b_mse"])  # type: ignore[arg-type]
    k_mode: str = str(DEFAULTS["k_mode"])
    v_mode: str = str(DEFAULTS["v_mode"])
    raw_window: int = int(DEFAULTS["raw_window"])  # type: ignore[call-overload]
    sink_tokens: int = int(DEFAULTS["sink_tokens"])  # type: ignore[call-overload]
    seed: int = int(DEFAULTS["seed"])  # type: ignore[call-overload]
    rotation: str = str(DEFAULTS["rotation"])
    codec_backend: str = str(DEFAULTS["codec_backend"])
    raw_seqs: int | None = None
    raw_share: float = float(DEFAULTS["raw_share"])  # type: ignore[arg-type]
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_seq_len: int | None = None
    device: str | None = None
    b_mse: float = float(DEFAULTS["b_mse"])  # type: ignore[arg-type]
    b_qjl: int = int(DEFAULTS["b_qjl"])  # type: ignore[call-overload]

    def __post_init__(self) -> None:
        for field, bits, mode in (("k", self.k_bits, self.k_mode), ("v", self.v_bits, self.v_mode)):
            var = f"TQ_{field.upper()}_BITS"
            if mode not in ("mse", "prod"):
                raise ConfigError(f"TQ_{field.upper()}_MODE={mode!r}: expected 'mse' or 'prod'")
            try:
                CodecConfig(d=64, bits=float(bits), mode=mode)
            except ValueError as exc:
                raise ConfigError(f"{var}={bits:g} ({field} mode {mode}): {exc}") from None
        for name, value in (("TQ_RAW_WINDOW", self.raw_window), ("TQ_SINK_TOKENS", self.sink_tokens),
                            ("TQ_SEED", self.seed)):
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 0")
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"TQ_ROTATION={self.rotation!r}: expected one of {', '.join(ROTATIONS)}")
        if self.raw_seqs is not None and self.raw_seqs < 0:
            raise ConfigError(f"TQ_RAW_SEQS={self.raw_seqs!r}: must be >= 0")
        if not 0.0 <= float(self.raw_share) < 1.0:  # NaN fails too
            raise ConfigError(f"TQ_RAW_SHARE={self.raw_share!r}: must be a fraction of the KV-cache budget "
                              "in [0, 1) (0 = no raw window)")
        if self.device is not None and self.device not in ("cpu", "cuda"):
            raise ConfigError(f"TQ_DEVICE={self.device!r}: expected 'cpu' or 'cuda'")
        if self.codec_backend != "auto":
            from turboquant_codec.backends import REGISTRY

            if self.codec_backend not in REGISTRY:
                raise ConfigError(
                    f"TQ_CODEC_BACKEND={self.codec_backend!r}: unknown; valid: auto, {', '.join(REGISTRY)}"
                )
        for field_name, var in _SHAPE_FIELDS:
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise ConfigError(f"{var}={value!r}: must be >= 1")
        if self.head_dim is not None:
            try:
                for bits, mode in ((self.k_bits, self.k_mode), (self.v_bits, self.v_mode)):
                    CodecConfig(d=self.head_dim, bits=bits, mode=mode, rotation=self.rotation)
            except ValueError as exc:
                raise ConfigError(f"TQ_HEAD_DIM={self.head_dim}: {exc}") from None

    # ------------------------------------------------------------------------------------ env
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TurboQuantConfig:
        """Read the ``TQ_*`` variables (``os.environ`` by default); ConfigError names a bad one."""
        env = os.environ if env is None else env
        b_mse = _float(env, "TQ_B_MSE")
        b_qjl = _int(env, "TQ_B_QJL", 0)
        if b_qjl is not None and b_qjl > 1:
            raise ConfigError(f"TQ_B_QJL={b_qjl}: expected 0 or 1 (QJL spends one bit per value)")
        base = float(DEFAULTS["b_mse"]) if b_mse is None else b_mse  # type: ignore[arg-type]
        qjl = int(DEFAULTS["b_qjl"]) if b_qjl is None else b_qjl  # type: ignore[call-overload]
        k_mode_env, v_mode_env = _mode(env, "TQ_K_MODE"), _mode(env, "TQ_V_MODE")
        if qjl and k_mode_env == "mse":
            raise ConfigError("TQ_B_QJL=1 selects QJL ('prod') keys but TQ_K_MODE='mse'; unset one of them")
        k_mode = k_mode_env or ("prod" if qjl else str(DEFAULTS["k_mode"]))
        v_mode = v_mode_env or str(DEFAULTS["v_mode"])
        k_bits, v_bits = _float(env, "TQ_K_BITS"), _float(env, "TQ_V_BITS")
        k_src = "TQ_K_BITS" if k_bits is not None else ("TQ_B_MSE + TQ_B_QJL" if qjl else "TQ_B_MSE")
        v_src = "TQ_V_BITS" if v_bits is not None else "TQ_B_MSE"
        if k_bits is None:
            k_bits = base + 1 if qjl else base
        if v_bits is None:
            v_bits = base
        for src, bits, mode in ((k_src, k_bits, k_mode), (v_src, v_bits, v_mode)):
            try:
                CodecConfig(d=64, bits=bits, mode=mode)
            except ValueError as exc:
                names = ("TQ_B_MSE", "TQ_B_QJL", "TQ_K_BITS", "TQ_V_BITS")
                shown = ", ".join(f"{n}={env[n]!r}" for n in names
                                  if n in src and _get(env, n) is not None) or f"default {bits:g}"
                raise ConfigError(f"{shown}: {bits:g} bits in mode {mode!r}: {exc}") from None
        device = _get(env, "TQ_DEVICE")
        backend = _get(env, "TQ_CODEC_BACKEND")
        return cls(
                k_bits=k_bits, v_bits=v_bits, k_mode=k_mode, v_mode=v_mode,
                raw_window=_default(_renamed_int(env, "TQ_RAW_WINDOW", 0), "raw_window"),
                sink_tokens=_default(_int(env, "TQ_SINK_TOKENS", 0), "sink_tokens"),
                seed=_default(_int(env, "TQ_SEED", 0), "seed"),
                rotation=_get(env, "TQ_ROTATION") or str(DEFAULTS["rotation"]),
                codec_backend=backend or str(DEFAULTS["codec_backend"]),
                raw_seqs=_int(env, "TQ_RAW_SEQS", 0),
                raw_share=_share(env, "TQ_RAW_SHARE"),
                num_layers=_int(env, "TQ_NUM_LAYERS", 1), num_heads=_int(env, "TQ_NUM_HEADS", 1),
                num_kv_heads=_int(env, "TQ_NUM_KV_HEADS", 1), head_dim=_int(env, "TQ_HEAD_DIM", 1),
                max_seq_len=_int(env, "TQ_MAX_SEQ_LEN", 1),
                device=device.lower() if device else None,
                b_mse=base, b_qjl=qjl,
            )

    # ------------------------------------------------------------------------------ validation
    def validate(
        self,
        *,
        num_layers: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        max_seq_len: int | None = None,
        device: str | None = None,
    ) -> TurboQuantConfig:
        """Check set fields against the model's values; returns a copy with the detected ones filled.

        Raises ConfigError naming the variable and both values when they disagree, or when the head
        dimension does not suit the codec.
        """
        detected = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                    "head_dim": head_dim, "max_seq_len": max_seq_len}
        for field_name, var in _SHAPE_FIELDS:
            mine, theirs = getattr(self, field_name), detected[field_name]
            if mine is not None and theirs is not None and int(mine) != int(theirs):
                raise ConfigError(
                    f"{var}={mine} disagrees with the model served by vLLM ({field_name}={theirs}); "
                    f"unset {var} or fix it"
                )
        if self.device is not None and device is not None and self.device != device:
            raise ConfigError(f"TQ_DEVICE={self.device!r} disagrees with vLLM's device {device!r}")
        if num_heads is not None and num_kv_heads is not None and num_heads % num_kv_heads:
            raise ConfigError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        d = head_dim if head_dim is not None else self.head_dim
        if d is not None:
            for var, bits, mode in (("TQ_K_BITS", self.k_bits, self.k_mode), ("TQ_V_BITS", self.v_bits,
                                                                                   self.v_mode)):
                try:
                    CodecConfig(d=int(d), bits=bits, mode=mode, rotation=self.rotation)
                except ValueError as exc:
                    raise ConfigError(f"head_dim={d} with {var}={bits:g} ({mode}): {exc}") from None
        filled: dict[str, Any] = {k: (getattr(self, k) if getattr(self, k) is not None else v)
                                  for k, v in detected.items()}
        return dataclasses.replace(self, device=self.device or device, **filled)

    # --------------------------------------------------------------------------------- sizes
    def record_bytes(self, head_dim: int) -> tuple[int, int]:
        """Bytes of one K record and one V record for ``head_dim`` (norms and padding included)."""
        return (CodecConfig(d=head_dim, bits=self.k_bits, mode=self.k_mode).record_bytes,
                CodecConfig(d=head_dim, bits=self.v_bits, mode=self.v_mode).record_bytes)

    def state_bytes(self, head_dim: int) -> int:
        """Bytes per (token, KV head) in vLLM's paged cache: the K record then the V record."""
        return sum(self.record_bytes(head_dim))

    def describe(self) -> str:
        return (f"K {self.k_mode} {self.k_bits:g} bits, V {self.v_mode} {self.v_bits:g} bits, "
                f"raw window {self.raw_window}, sinks {self.sink_tokens}, seed {self.seed}, "
                f"rotation {self.rotation}, "
                f"raw pool <= {self.raw_share:g} of the KV budget")


def _share(env: Mapping[str, str], name: str) -> float:
    raw = _get(env, name)
    if raw is None:
        return float(DEFAULTS["raw_share"])  # type: ignore[arg-type]
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a fraction such as 0.1") from None


def marker_file(env: Mapping[str, str] | None = None) -> str | None:
    """``TQ_MARKER_FILE``: the evidence file each process appends to, or None."""
    return _get(os.environ if env is None else env, "TQ_MARKER_FILE")


def platform_disabled(env: Mapping[str, str] | None = None) -> bool:
    """``TQ_DISABLE_PLATFORM=1``: the CPU platform plugin stands aside."""
    return _get(os.environ if env is None else env, "TQ_DISABLE_PLATFORM") == "1"


def _renamed_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    """``_int`` of ``name``, or of its old name (``DEPRECATED_VARS``) with a deprecation warning when
    ``name`` is unset; ConfigError when both are set to different values."""
    old = next(o for o, n in DEPRECATED_VARS.items() if n == name)
    value, old_value = _int(env, name, minimum), _int(env, old, minimum)
    if old_value is None:
        return value
    if value is not None and value != old_value:
        raise ConfigError(f"{name}={value} and {old}={old_value} disagree: {old} is the old name of {name}; "
                          f"unset {old}")
    logger.warning("%s is deprecated: it is read as %s=%d (the raw recent window); set %s instead",
                   old, name, old_value, name)
    return old_value


def _default(value: int | None, key: str) -> int:
    return int(DEFAULTS[key]) if value is None else value  # type: ignore[call-overload]
