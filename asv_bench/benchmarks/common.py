"""Shared helpers for the asv suite: which backend/configuration combinations run, and how data
is placed on a backend's device.

The parameter grids are fixed tuples so that results line up across commits and machines. Each
combination is checked at setup against the registry (``availability`` with its reason) and the
capability table (``CAPABILITIES[op][backend].refusal``); an unavailable backend or a refused
combination raises ``NotImplementedError``, which asv records as skipped (n/a), not failed.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from turboquant_codec import _interop
from turboquant_codec.capabilities import CAPABILITIES
from turboquant_codec.testing import kv_like, unit_vectors  # noqa: F401  (re-exported for the benchmarks)

# The registry module itself (at older commits ``turboquant_codec.backends`` is a function).
registry = importlib.import_module("turboquant_codec.backends")

# The backends of the current registry in a fixed order (a backend not registered at an older
# commit is skipped there), then any backend registered later, so it is benchmarked as soon as it
# is declared.
_KNOWN = ("numpy", "numba_cuda", "cupy_raw")
BACKENDS = _KNOWN + tuple(name for name in registry.REGISTRY if name not in _KNOWN)
HEAD_DIMS = (64, 128, 256)
# "mode-bits": integer and half-integer (outlier split) MSE widths, and one QJL width.
CONFIGS = ("mse-2.5", "mse-3.5", "mse-4", "prod-3.5")
# Tokens per KV head (8 KV heads). The CPU reference is float64 NumPy: it runs the two small sizes.
TOKENS = (256, 2048, 65536)
CPU_MAX_TOKENS = 2048
KV_HEADS = 8
Q_HEADS = 32  # grouped-query attention: 4 query heads per KV head
SCORE_QUERIES = 16  # queries per KV head for `scores`
TAIL = 16  # uncompressed recent tokens for `attention`
DTYPE = np.float16  # the KV cache dtype benchmarked (inputs of encode, scores, attention)

# TQ_ASV_SMOKE=1 (tests/test_asv.py): same parameter grid, tiny data, to prove every benchmark runs.
SMOKE = os.environ.get("TQ_ASV_SMOKE") == "1"


def scaled(n: int, smoke: int = 64) -> int:
    """``n`` items of data, or ``smoke`` of them in a smoke run."""
    return min(n, smoke) if SMOKE else n


def _reusing(make: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """``make(rng, shape, ...)`` that hands back, read-only, the array an identical call (same
    generator state, shape and arguments) already made in this process, and leaves ``rng`` in the
    state that call left it in: the same data and the same generator stream, without drawing again.
    """
    cache: dict[tuple[Any, ...], tuple[np.ndarray, Any]] = {}

    def reused(rng: np.random.Generator, shape: tuple[int, ...], *args: Any, **kwargs: Any) -> np.ndarray:
        state = json.dumps(rng.bit_generator.state, sort_keys=True)
        key = (state, tuple(shape), args, tuple(sorted(kwargs.items())))
        if key in cache:
            out, after = cache[key]
            rng.bit_generator.state = after
            return out
        out = make(rng, shape, *args, **kwargs)
        out.setflags(write=False)
        cache[key] = (out, rng.bit_generator.state)
        while len(cache) > 4:  # one benchmark process needs at most three (Quality: q, k, v)
            del cache[next(iter(cache))]
        return out

    return reused


# TQ_ASV_REUSE_DATA=1 (gpu_run.sh): this asv_runner re-runs ``setup`` before every timed sample
# (asv#966: each sample sees freshly set-up state), so each sample redrew its KV data: ~1.5-3 s of
# host RNG per 8 x 65536 x 128 array, against a GPU call of ~1 ms. Reusing the drawn arrays makes a
# sample cost an upload and an encode, so GPU runs can afford medians of several samples. Off by
# default: the kept arrays would raise the host peak RSS that ``peakmem_*`` reports for the CPU
# reference. Defined here, not in the benchmarks, so benchmark versions (a hash of their source) and
# the recorded history stay valid.
if os.environ.get("TQ_ASV_REUSE_DATA") == "1":
    kv_like = _reusing(kv_like)  # noqa: F811


# Fewer, shorter samples than asv's defaults: the whole suite takes minutes on a 2-core CPU.
TIMING = {"repeat": (1, 3, 1.5), "warmup_time": 0.05, "sample_time": 0.02, "min_run_count": 1}


class Timed:
    """asv's sampling attributes of every timed benchmark class (``TIMING``; a class overrides
    ``timeout`` where its setup takes longer)."""

    repeat = TIMING["repeat"]
    warmup_time = TIMING["warmup_time"]
    sample_time = TIMING["sample_time"]
    min_run_count = TIMING["min_run_count"]
    timeout = 300


def _probe_availability() -> dict[str, tuple[bool, str]]:
    """Availability of every registered backend, probed once in a child process.

    asv runs each benchmark combination in a process forked from a server that has imported this
    module. Probing here (not in each fork) saves importing numba/cupy per skipped combination, and
    doing it in a child keeps CUDA uninitialised in the server (a CUDA context does not survive a
    fork). Each fork still checks ``availability`` itself before running.
    """
    code = (
        "import json, importlib; r = importlib.import_module('turboquant_codec.backends'); "
        "print(json.dumps({n: [bool(r.availability(n)), r.availability(n).reason] for n in r.REGISTRY}))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
        ).stdout
        return {name: (ok, reason) for name, (ok, reason) in json.loads(out.splitlines()[-1]).items()}
    except Exception as exc:  # fall back to probing in each process
        print(f"asv_bench: availability probe failed ({exc}); probing per process", file=sys.stderr)
        return {}


AVAILABILITY = _probe_availability()


def parse_config(config: str) -> tuple[str, float]:
    mode, bits = config.split("-")
    return mode, float(bits)


def device_of(backend: str) -> str:
    return registry.REGISTRY[backend][1]


def require(op: str, backend: str, head_dim: int, config: str, tokens: int | None = None) -> None:
    """Raise NotImplementedError (asv: skipped) unless ``backend`` can run this combination here."""
    if backend not in registry.REGISTRY:
        raise NotImplementedError(f"backend {backend} is not registered at this commit")
    if device_of(backend) != "cpu" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise NotImplementedError(f"backend {backend}: Numba's CUDA simulator is not timed")
    support = CAPABILITIES.get(op, {}).get(backend)
    if support is None:
        raise NotImplementedError(f"backend {backend} does not implement {op}")
    mode, bits = parse_config(config)
    refusal = support.refusal(np.dtype(DTYPE).name, head_dim, bits, mode)
    if refusal:
        raise NotImplementedError(f"backend {backend} does not support {refusal} for {op}")
    if tokens is not None and device_of(backend) == "cpu" and tokens > CPU_MAX_TOKENS:
        raise NotImplementedError(f"{tokens} tokens: too large for the CPU reference suite")
    ok, reason = AVAILABILITY.get(backend, (True, ""))
    if ok:
        status = registry.availability(backend)
        ok, reason = status.ok, status.reason
    if not ok:
        raise NotImplementedError(f"backend {backend} unavailable: {reason}")


def _cupy() -> Any:
    try:
        import cupy

        return cupy if cupy.cuda.is_available() else None
    except Exception:
        return None


def put(backend: str, x: np.ndarray) -> Any:
    """Host array -> where ``backend`` reads it (as tests/conftest.py does)."""
    if device_of(backend) == "cpu":
        return x
    cupy = _cupy()
    if cupy is not None:
        return cupy.asarray(x)
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(x))


def synchronizer(backend: str) -> Callable[[], None]:
    """A function that waits for all work queued on the backend's device (no-op on CPU)."""
    if device_of(backend) == "cpu":
        return lambda: None
    cupy = _cupy()
    from numba import cuda

    def sync() -> None:
        cuda.synchronize()
        if cupy is not None:
            cupy.cuda.Device().synchronize()

    return sync


def to_numpy(x: Any) -> np.ndarray:
    return _interop.to_numpy(x)


class DevicePeak:
    """Peak bytes held by CuPy's memory pool while a block runs (CuPy memory hook).

    Only CuPy allocations are seen: usable for backends that allocate through CuPy.
    """

    def __init__(self) -> None:
        import cupy.cuda.memory_hook as memory_hook

        outer = self

        class _Hook(memory_hook.MemoryHook):  # type: ignore[misc]
            name = "tq_peak"

            def malloc_postprocess(self, **kwargs: Any) -> None:
                outer.current += kwargs["mem_size"]
                outer.peak = max(outer.peak, outer.current)

            def free_postprocess(self, **kwargs: Any) -> None:
                outer.current -= kwargs["mem_size"]

        self.hook = _Hook()
        self.current = 0
        self.peak = 0
