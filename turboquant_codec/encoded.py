"""``Encoded``: compressed vectors as arrays of byte records, plus the configuration that made them.

Layout owned here::

    records   (*lead, n, record_bytes) uint8   one record per vector (see ``config``)
    channels  (*lead, d) uint16 or None        per stream: outlier channels, then regular channels,
                                               each ascending; None when bits are an integer

Both arrays live in the library and on the device of the input that was encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _interop, _validate, serialization
from .config import CodecConfig


@dataclass(frozen=True, eq=False)
class Encoded:
    """Compressed vectors of shape ``(*lead, n, d)``.

    Attributes
    ----------
    records : array, shape (*lead, n, record_bytes), uint8
    channels : array, shape (*lead, d), uint16, or None
        Channel permutation of each stream: the ``d/2`` outlier channels first.
    config : CodecConfig
    """

    records: Any
    channels: Any
    config: CodecConfig

    def __post_init__(self) -> None:
        _validate.encoded_arrays(self.records, self.channels, self.config)
        if self.channels is not None:
            _validate.permutation(self.channels, self.config.d)

    def _memo(self) -> dict[str, Any]:
        """Data derived from this object and kept with it by the layers that call a backend (native
        views, launch arguments): not a field, so never compared, printed, copied or pickled."""
        memo: dict[str, Any] | None = self.__dict__.get("_derived")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_derived", memo)
        return memo

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_derived", None)
        return state

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the vectors encoded: ``(*lead, n, d)``."""
        return tuple(self.records.shape[:-1]) + (self.config.d,)

    @property
    def bits(self) -> float:
        """Nominal code bits per channel."""
        return self.config.bits

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def nbytes(self) -> int:
        """Every stored byte: records (norms and padding included) and channel permutations."""
        size = int(np.prod(self.records.shape))
        if self.channels is not None:
            size += 2 * int(np.prod(self.channels.shape))
        return size

    @property
    def bits_per_value(self) -> float:
        """Honest stored bits per encoded value, ``8 * nbytes / prod(shape)``."""
        return 8 * self.nbytes / int(np.prod(self.shape))

    def to_bytes(self) -> bytes:
        """Serialise to the self-describing stream of ``serialization`` (copies from a GPU)."""
        channels = None if self.channels is None else _interop.to_numpy(self.channels)
        return serialization.dumps(self.config, _interop.to_numpy(self.records), channels)

    @classmethod
    def from_bytes(cls, data: bytes) -> Encoded:
        """Parse ``to_bytes`` output into NumPy arrays.

        Raises
        ------
        ValueError
            On truncated or corrupted data, an unknown format version or an invalid permutation.
        """
        cfg, records, channels = serialization.loads(data)
        return cls(records=records, channels=channels, config=cfg)

    def __repr__(self) -> str:
        return (
            f"Encoded(shape={self.shape}, bits={self.bits:g}, mode={self.mode!r}, seed={self.seed}, "
            f"bits_per_value={self.bits_per_value:.3f}, library={_interop.library_of(self.records)!r})"
        )
