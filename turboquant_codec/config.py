"""Codec configuration and the fixed-size byte record it implies.

A vector of ``d`` channels is split into at most two channel groups, each quantized by its own
TurboQuant instance (own rotation, codebook, norm and QJL sketch):

- integer ``bits``: one group of all ``d`` channels;
- half-integer ``bits`` (e.g. 3.5): ``d/2`` "outlier" channels at ``ceil(bits)`` and ``d/2`` regular
  channels at ``floor(bits)``, so the nominal code bits per channel are exactly ``bits``.

Within a group of ``g`` channels at ``b`` bits, mode ``"mse"`` spends all ``b`` bits on a Lloyd-Max code
(TurboQuant_mse); mode ``"prod"`` spends ``b - 1`` bits on the code and 1 bit on the QJL sign of the
residual (TurboQuant_prod).

Byte record of one vector (little-endian, ``record_bytes`` long, a multiple of 4)::

    offset 0                 bfloat16 norms: per group, |x_g| then (prod only) |x_g - x_mse_g|
    then, per group          packed codes: g * code_bits bits, LSB-first bit stream
    then, per group (prod)   packed QJL signs: g bits, LSB-first, 1 = non-negative projection
    then                     zero padding to a multiple of 4 bytes

Groups come outlier group first. Norms lead the record so they stay 2-byte aligned for any layout.

Norms are bfloat16, rounded to nearest even (the reference rounds its float64 norms directly, with no
float32 step): float32's range (~1e-38 to 3.4e38, subnormals down to 9e-41) in the 2 bytes that float16
took (6e-8 to 65504), at 8 significant bits instead of 11 (relative rounding error below 2**-8 instead
of 2**-11; what that does to the codec's error: ``benchmarks/RESULTS-norms.md``). Byte format version 2
stored float16 norms; ``serialization`` converts them on load.

Each group is rotated before quantization by a ``g x g`` orthogonal matrix of kind ``rotation``
(``transforms`` builds them): ``"haar"`` (dense Haar-random, the paper's), ``"hadamard2"`` (two rounds
of Walsh-Hadamard with random signs from the seed) or ``"hadamard"`` (fixed normalised Walsh-Hadamard,
no signs: upstream vLLM's). The Hadamard kinds need power-of-two groups: a configuration whose
groups are not (e.g. d=96, or d=48 split into 24 + 24) is refused with a ValueError, never padded.
The rotation kind changes no byte of the record, only the matrices the codes are read with.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from . import _validate
from ._validate import DTYPES, MAX_SEED  # noqa: F401  (re-exported: the rules live in _validate)

MODES = ("mse", "prod")
# Rotation kinds; their index is the byte the stream header records (``serialization``).
ROTATIONS = ("haar", "hadamard2", "hadamard")
# Per-group bits the Lloyd-Max tables cover; prod adds one QJL bit on top of the code bits.
MSE_BITS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
PROD_BITS = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
# Records hold whole bytes per group and an even split of channels: d must divide by 16.
HEAD_DIM_MULTIPLE = 16
MAX_HEAD_DIM = 1024
# Norms from here up round to bfloat16 infinity (halfway between its largest finite value,
# 2**128 - 2**120, and 2**128): encode refuses them.
NORM_LIMIT = 2.0**128 - 2.0**119


def norm_range_error(count: int) -> ValueError:
    """The error every backend's encode raises for ``count`` norms at or above ``NORM_LIMIT``."""
    return ValueError(
        f"{count} channel-group norms are {NORM_LIMIT:.4g} or more, past the bfloat16 norm range of "
        "the byte record"
    )


@dataclass(frozen=True)
class Group:
    """One channel group inside a record.

    Attributes
    ----------
    index : int
        0 for the outlier (or only) group, 1 for the regular group.
    dim : int
        Channels in the group.
    code_bits : int
        Lloyd-Max code width.
    qjl : bool
        Whether a 1-bit QJL sketch of the residual follows.
    code_offset, sign_offset, norm_offset : int
        Byte offsets inside the record (``sign_offset`` is -1 without QJL).
    """

    index: int
    dim: int
    code_bits: int
    qjl: bool
    code_offset: int
    sign_offset: int
    norm_offset: int

    @property
    def code_bytes(self) -> int:
        return self.dim * self.code_bits // 8

    @property
    def sign_bytes(self) -> int:
        return self.dim // 8 if self.qjl else 0


@dataclass(frozen=True)
class CodecConfig:
    """What fixes a TurboQuant instance: head dimension, nominal bits, mode, seed and rotation kind.

    Parameters
    ----------
    d : int
        Channels per vector (multiple of 16, at most 1024).
    bits : float
        Nominal bits per channel: "mse" 1-4, "prod" 2-5, integers or halves.
    mode : {"mse", "prod"}
    seed : int
        Seeds every random transform (rotations, QJL projections), 0 <= seed < 2**64.
    rotation : {"haar", "hadamard2", "hadamard"}
        Kind of each group's rotation (module docstring); the Hadamard kinds need power-of-two
        groups. ``"hadamard"`` ignores the seed for the rotation (QJL projections still use it).
    """

    d: int
    bits: float
    mode: str = "mse"
    seed: int = 0
    rotation: str = "haar"

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        bits = _validate.real(self.bits, "bits")
        allowed = MSE_BITS if self.mode == "mse" else PROD_BITS
        if bits not in allowed:
            raise ValueError(
                f"bits={self.bits!r} is not supported for mode {self.mode!r}; "
                f"choose one of {', '.join(f'{b:g}' for b in allowed)}"
            )
        d = _validate.integer(self.d, "head dimension d")
        if d % HEAD_DIM_MULTIPLE or not 0 < d <= MAX_HEAD_DIM:
            raise ValueError(
                f"head dimension d={d!r} must be a positive multiple of {HEAD_DIM_MULTIPLE} "
                f"up to {MAX_HEAD_DIM}"
            )
        # Plain Python values: configs key caches and equal configs must hash alike.
        object.__setattr__(self, "d", d)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "seed", _validate.seed(self.seed))
        if not isinstance(self.rotation, str) or self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.rotation != "haar":
            dims = sorted({g.dim for g in self.groups})
            if any(g & (g - 1) for g in dims):
                raise ValueError(
                    f"rotation={self.rotation!r} needs power-of-two channel groups, but d={self.d} at "
                    f"bits={self.bits:g} gives groups of {', '.join(map(str, dims))}; use rotation='haar'"
                )

    @property
    def split(self) -> bool:
        """Whether channels are split into an outlier and a regular group."""
        return self.bits != math.floor(self.bits)

    @property
    def outlier_dim(self) -> int:
        """Channels in the outlier group (0 without a split)."""
        return self.d // 2 if self.split else 0

    @property
    def groups(self) -> tuple[Group, ...]:
        return _layout(self)[0]

    @property
    def record_bytes(self) -> int:
        """Bytes of one encoded vector, norms and padding included."""
        return _layout(self)[1]

    @property
    def norms_per_group(self) -> int:
        return 2 if self.mode == "prod" else 1

    @property
    def bits_per_value(self) -> float:
        """Honest stored bits per channel of one record (norms and padding included)."""
        return self.record_bytes * 8 / self.d


@functools.cache
def _layout(cfg: CodecConfig) -> tuple[tuple[Group, ...], int]:
    qjl = cfg.mode == "prod"
    hi = math.ceil(cfg.bits) - int(qjl)
    lo = math.floor(cfg.bits) - int(qjl)
    dims_bits = [(cfg.d // 2, hi), (cfg.d // 2, lo)] if cfg.split else [(cfg.d, hi)]
    n_norms = len(dims_bits) * cfg.norms_per_group
    offset = 2 * n_norms
    code_offsets = []
    for dim, bits in dims_bits:
        code_offsets.append(offset)
        offset += dim * bits // 8
    sign_offsets = []
    for dim, _ in dims_bits:
        sign_offsets.append(offset if qjl else -1)
        offset += dim // 8 if qjl else 0
    groups = tuple(
        Group(
            index=i,
            dim=dim,
            code_bits=bits,
            qjl=qjl,
            code_offset=code_offsets[i],
            sign_offset=sign_offsets[i],
            norm_offset=2 * i * cfg.norms_per_group,
        )
        for i, (dim, bits) in enumerate(dims_bits)
    )
    return groups, -(-offset // 4) * 4
