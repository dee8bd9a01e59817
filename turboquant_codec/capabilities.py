"""One capability table per op: which dtypes, head dimensions, bits and modes each backend serves.

Dispatch refuses a request outside the table with the reason; tests and benchmarks parametrise over
the same table, so a new entry is tested and benchmarked as soon as it is declared.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._ops import OPS
from .config import DTYPES, HEAD_DIM_MULTIPLE, MAX_HEAD_DIM, MSE_BITS, PROD_BITS

ALL_HEAD_DIMS = tuple(range(HEAD_DIM_MULTIPLE, MAX_HEAD_DIM + 1, HEAD_DIM_MULTIPLE))
ALL_BITS = {"mse": MSE_BITS, "prod": PROD_BITS}


@dataclass(frozen=True)
class Support:
    """What one backend serves for one op."""

    dtypes: tuple[str, ...] = DTYPES
    head_dims: tuple[int, ...] = ALL_HEAD_DIMS
    bits: dict[str, tuple[float, ...]] | None = None

    def refusal(self, dtype: str | None, d: int, bits: float, mode: str) -> str | None:
        """Why this request is not served, or None when it is."""
        if dtype is not None and dtype not in self.dtypes:
            return f"dtype {dtype} (supported: {', '.join(self.dtypes)})"
        if d not in self.head_dims:
            return f"head dimension {d} (supported: {_ranges(self.head_dims)})"
        allowed = (self.bits or ALL_BITS).get(mode, ())
        if bits not in allowed:
            return f"{bits:g} bits in mode {mode!r} (supported: {', '.join(f'{b:g}' for b in allowed)})"
        return None


# CAPABILITIES[op][backend]: the NumPy reference serves every valid configuration.
CAPABILITIES: dict[str, dict[str, Support]] = {op: {"numpy": Support()} for op in OPS}

# Numba CUDA: every dtype, mode and bit width; the head dimensions tests/test_numba_cuda.py covers
# (shared-memory tiles are sized for d <= 256).
NUMBA_CUDA_HEAD_DIMS = (16, 32, 64, 128, 256)
for _op in OPS:
    CAPABILITIES[_op]["numba_cuda"] = Support(head_dims=NUMBA_CUDA_HEAD_DIMS)

# CuPy RawModule: every dtype, mode and bit width at the head dimensions its GPU tests cover. The
# attention kernel's tensor-core tiles need 16 | d/2 (d multiple of 32); codec kernels keep one
# block's tiles in static shared memory (d <= 128 with prod tables).
CUPY_RAW_HEAD_DIMS = (64, 128)
for _op in OPS:
    CAPABILITIES[_op]["cupy_raw"] = Support(head_dims=CUPY_RAW_HEAD_DIMS)

# Numba on the host (compiled loops over the codes): paged attention with mse K and V, which serving
# calls every step; every other request on the host is the NumPy reference's.
CAPABILITIES["paged_attention"]["numba_cpu"] = Support(bits={"mse": MSE_BITS})


def _ranges(values: tuple[int, ...]) -> str:
    if len(values) > 4 and values == tuple(range(values[0], values[-1] + 1, values[1] - values[0])):
        return f"{values[0]}..{values[-1]} in steps of {values[1] - values[0]}"
    return ", ".join(map(str, values))
