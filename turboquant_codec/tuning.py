"""Every tuning knob of the backends (the GPU ones, the host's rotation path) and every environment
variable the codec reads, in one place.

Settings are frozen dataclasses, one per backend, gathered in ``Tuning``. A backend reads
``current()`` at each call and keys its build and plan caches on the settings object it got, so a
changed setting builds and plans its own cache entries (no cache is keyed over hidden globals, and
nothing needs clearing). Change settings by replacing them whole::

    from turboquant_codec import tuning
    with tuning.using(cupy_raw=tuning.CupyRawTuning(attn_warps=8)):
        ...                                     # this block builds and plans for 8 warps
    tuning.use(tuning.Tuning())                 # or for the rest of the process

Environment variables (read only here):

=====================  ===================================================  ===================
variable               meaning                                              read
=====================  ===================================================  ===================
``TQ_BACKEND``         the backend ``backend="auto"`` stands for            at every call
``TQ_CUPY_RAW_WGMMA``  ``0``/``1``: ``CupyRawTuning.enc_tc_wgmma``           at import
``TQ_CUPY_RAW_ENCODE`` ``auto``/``scalar``: ``CupyRawTuning.encode_path``    at import
=====================  ===================================================  ===================

The integrations read their own variables (``turboquant_vllm.config``) and pass what they chose
as arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

ENCODE_PATHS = ("auto", "scalar")
ROTATION_PATHS = ("auto", "dense", "numpy", "numba")


def _positive(owner: object, name: str, value: int | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{type(owner).__name__}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class CupyRawTuning:
    """Launch shapes of the CuPy RawModule kernels (``backends/cupy_raw*.py``).

    Attributes
    ----------
    attn_warps : int
        Warps per block of the attention split kernel: one block of 16 warps per SM shares one copy
        of the per-lane replicated pair tables (40 KB at 3.5 bits, at most ~66 KB) and keeps 16 x 4
        tiles of ~2 KB in flight; 16 warps per SM cap registers at 128 per thread.
    attn_stages : int
        Its cp.async ring depth; configurations whose tables and ring overflow shared memory get
        fewer stages (``cupy_raw_attn.attention_stages``).
    attn_minblocks : int
        Its ``__launch_bounds__`` minimum blocks per SM.
    enc_tc_warps : int or None
        Warps of the tensor-core encode's one block per SM; None: as many as its shared memory holds,
        at most ``enc_tc_max_warps``.
    enc_tc_mt : int or None
        16-vector m-tiles per warp tile of the tensor-core encode; None: 2, or 1 for float32 input,
        whose hi/lo split doubles the fragments.
    enc_tc_max_warps : int
        12 leave it 168 registers per thread, no spills; 14 and 16 cap it at 128 and spill
        (timings per warp count: benchmarks/RESULTS-cupy_raw.md).
    enc_tc_wgmma : bool or None
        Whether the codec kernels are built for sm_90a, where the tensor-core encode rotates with
        warpgroup mma (each rotation fragment read from shared memory once per 64 vectors) instead
        of mma.sync: None = on every compute capability 9.0 device; False = mma.sync everywhere.
    encode_path : {"auto", "scalar"}
        Which encode kernel runs: "auto" (tensor cores where ``cupy_raw_tc.tc_encode_ok``), "scalar"
        (``tq_encode`` always).
    """

    attn_warps: int = 16
    attn_stages: int = 4
    attn_minblocks: int = 1
    enc_tc_warps: int | None = None
    enc_tc_mt: int | None = None
    enc_tc_max_warps: int = 12
    enc_tc_wgmma: bool | None = None
    encode_path: str = "auto"

    def __post_init__(self) -> None:
        for name in ("attn_warps", "attn_stages", "attn_minblocks", "enc_tc_max_warps"):
            _positive(self, name, getattr(self, name))
        _positive(self, "enc_tc_warps", self.enc_tc_warps, optional=True)
        _positive(self, "enc_tc_mt", self.enc_tc_mt, optional=True)
        if self.attn_stages < 2:
            raise ValueError(f"CupyRawTuning.attn_stages must be >= 2, got {self.attn_stages}")
        if self.enc_tc_wgmma not in (None, False, True):
            raise ValueError(f"CupyRawTuning.enc_tc_wgmma must be None, False or True, "
                             f"got {self.enc_tc_wgmma!r}")
        if self.encode_path not in ENCODE_PATHS:
            raise ValueError(f"CupyRawTuning.encode_path must be one of {ENCODE_PATHS}, "
                             f"got {self.encode_path!r}")


@dataclass(frozen=True)
class CupyPagedTuning:
    """Launch shapes and path thresholds of cupy_raw's fused paged decode (``backends/cupy_paged.py``,
    ``cuda/tq_paged.cu``). The split's chunk, ``split_warps * tiles_per_warp`` 16-token tiles, is
    fixed in tokens under one setting: a request's output does not depend on its batch, but does on
    these settings.

    Attributes
    ----------
    split_warps : int
        Warps of a ``tq_paged_split`` block, and of a ``tq_paged_prep`` block (its raw-partial blocks
        use all ``32 * split_warps`` threads); at most 32.
    tiles_per_warp : int
        16-token tiles each split warp streams per chunk, 1 to 32 (one tile per lane of the block
        lookup): the default gives one chunk, hence one partial, per 8192 tokens.
    stages : int
        Deepest cp.async ring of the split (>= 2); configurations whose tables and ring overflow
        shared memory get fewer stages (``cupy_paged._stages``).
    raw_scan : int
        Block-table entries each thread of a raw partial scans: one raw block takes
        ``32 * split_warps * raw_scan`` logical blocks of a stream (``cupy_paged.raw_part``).
    raw_u : int
        Listed raw tokens a warp of the raw partial loads at once (capped at 16 / query heads per KV
        head, which bounds its registers).
    side_min_streams : int
        KV streams (requests x KV heads) from which the raw partials run on a side stream beside the
        split: below it the split grid is about one wave, and raw blocks beside it would hold SMs it
        needs (RESULTS-paged.md has the timings of both placements).
    side_row_threads : int
        Threads of a query-preparation block when the rows have ``tq_paged_prep``'s launch to
        themselves (side stream mode): the kernel's registers are sized for its raw-partial blocks,
        so fewer threads let more row blocks share an SM. A multiple of 32, at most
        ``32 * split_warps`` (the kernel's launch bounds).
    max_stage_bytes : int
        Bytes a split block's ring may give one tile's K+V span; a cache whose records lie further
        apart (a contiguous ``[num_blocks, block_size, H, R]`` cache with many heads) takes the
        generic path.
    generic_rows : int
        Query rows per dense product on the generic path (bounds its logits' memory).
    """

    split_warps: int = 16
    tiles_per_warp: int = 32
    stages: int = 4
    raw_scan: int = 2
    raw_u: int = 4
    side_min_streams: int = 128
    side_row_threads: int = 128
    max_stage_bytes: int = 8 * 1024
    generic_rows: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _positive(self, f.name, getattr(self, f.name))
        for name, top in (("split_warps", 32), ("tiles_per_warp", 32)):
            if getattr(self, name) > top:
                raise ValueError(f"CupyPagedTuning.{name} must be <= {top}, got {getattr(self, name)}")
        if self.stages < 2:
            raise ValueError(f"CupyPagedTuning.stages must be >= 2, got {self.stages}")
        if self.side_row_threads % 32 or self.side_row_threads > 32 * self.split_warps:
            raise ValueError(f"CupyPagedTuning.side_row_threads must be a multiple of 32 and at most "
                             f"32 * split_warps = {32 * self.split_warps}, got {self.side_row_threads}")


@dataclass(frozen=True)
class NumbaCudaTuning:
    """Compile options of the Numba CUDA warp attention kernel (``backends/numba_warp_attention.py``).

    Attributes
    ----------
    attn_max_registers : int or None
        Register cap of the kernel (None: the compiler's choice); the benchmark tries both.
    attn_prefetch : bool
        Load the next key tile's record words into registers while working on this one (hides global
        latency, costs ~KWORDS+VWORDS registers); the benchmark times both.
    """

    attn_max_registers: int | None = None
    attn_prefetch: bool = False

    def __post_init__(self) -> None:
        _positive(self, "attn_max_registers", self.attn_max_registers, optional=True)
        if not isinstance(self.attn_prefetch, bool):
            raise ValueError(f"NumbaCudaTuning.attn_prefetch must be a bool, got {self.attn_prefetch!r}")


@dataclass(frozen=True)
class HostTuning:
    """How the host (the NumPy reference, and the transforms it shares) computes.

    Attributes
    ----------
    rotation_path : {"auto", "dense", "numpy", "numba"}
        How the Hadamard rotation kinds are applied on the host (``transforms.rotate``; Haar is always
        the dense product): "dense" the ``g x g`` BLAS product, "numpy" sign flips and NumPy
        butterflies, "numba" sign flips and a compiled fast Walsh-Hadamard transform; "auto" Numba
        when it imports, else dense (timings: ``benchmarks/RESULTS-rotation.md``).
    """

    rotation_path: str = "auto"

    def __post_init__(self) -> None:
        if self.rotation_path not in ROTATION_PATHS:
            raise ValueError(f"HostTuning.rotation_path must be one of {ROTATION_PATHS}, "
                             f"got {self.rotation_path!r}")


@dataclass(frozen=True)
class Tuning:
    """The settings of every backend."""

    cupy_raw: CupyRawTuning = field(default_factory=CupyRawTuning)
    cupy_paged: CupyPagedTuning = field(default_factory=CupyPagedTuning)
    numba_cuda: NumbaCudaTuning = field(default_factory=NumbaCudaTuning)
    host: HostTuning = field(default_factory=HostTuning)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind = {"cupy_raw": CupyRawTuning, "cupy_paged": CupyPagedTuning, "numba_cuda": NumbaCudaTuning,
                    "host": HostTuning}[f.name]
            if not isinstance(getattr(self, f.name), kind):
                raise TypeError(f"Tuning.{f.name} must be a {kind.__name__}, "
                                f"got {type(getattr(self, f.name)).__name__}")


BACKEND_VAR = "TQ_BACKEND"
_WGMMA_VAR, _ENCODE_VAR = "TQ_CUPY_RAW_WGMMA", "TQ_CUPY_RAW_ENCODE"


def from_env(env: Mapping[str, str] | None = None) -> Tuning:
    """The default settings with the environment's overrides (``os.environ`` by default).

    Raises
    ------
    ValueError
        Naming the variable, for a value it does not take.
    """
    env = os.environ if env is None else env
    changes: dict[str, object] = {}
    wgmma = env.get(_WGMMA_VAR, "")
    if wgmma:
        if wgmma not in ("0", "1"):
            raise ValueError(f"{_WGMMA_VAR} must be 0 or 1, got {wgmma!r}")
        changes["enc_tc_wgmma"] = wgmma == "1"
    path = env.get(_ENCODE_VAR, "")
    if path:
        if path not in ENCODE_PATHS:
            raise ValueError(f"{_ENCODE_VAR} must be one of {ENCODE_PATHS}, got {path!r}")
        changes["encode_path"] = path
    return Tuning(cupy_raw=CupyRawTuning(**changes))  # type: ignore[arg-type]


def requested_backend(env: Mapping[str, str] | None = None) -> str:
    """``TQ_BACKEND`` (read at every call), or ``"auto"`` when unset or empty."""
    env = os.environ if env is None else env
    return env.get(BACKEND_VAR, "") or "auto"


_current = from_env()


def current() -> Tuning:
    """The settings in force."""
    return _current


def use(tuning: Tuning) -> None:
    """Put ``tuning`` in force for the rest of the process."""
    global _current
    if not isinstance(tuning, Tuning):
        raise TypeError(f"tuning must be a Tuning, got {type(tuning).__name__}")
    _current = tuning


@contextlib.contextmanager
def using(**settings: Any) -> Iterator[Tuning]:
    """Put the given backends' settings in force inside the block (the others stay), then restore.

    Parameters
    ----------
    **settings
        ``cupy_raw=CupyRawTuning(...)``, ``cupy_paged=CupyPagedTuning(...)``,
        ``numba_cuda=NumbaCudaTuning(...)``, ``host=HostTuning(...)``.
    """
    before = _current
    use(dataclasses.replace(before, **settings))
    try:
        yield _current
    finally:
        use(before)
