"""Timing shared by the benchmark scripts: CUDA events around back-to-back calls, medians."""

from __future__ import annotations

import statistics
import time

# Sleep-kernel cycles that hold the stream busy ahead of a primed timing (~2.5 ms at H100/H200
# clocks): longer than the host needs to queue a batch of calls.
PRIME_CYCLES = 5_000_000


def timed(fn, reps: int = 30, warmup: int = 5, batch: int = 10, primed: bool = False) -> float:
    """Median milliseconds of ``fn()`` on torch's current stream (CUDA events around ``batch``
    back-to-back calls, so Python launch overhead overlaps GPU work as in a decode loop).

    ``primed``: a sleep kernel runs ahead of the first event, so all ``batch`` calls are queued
    before the GPU reaches them and the figure is GPU time alone, without the host's time to issue
    the first call (NVBench's blocking-kernel method)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if primed:
            torch.cuda._sleep(PRIME_CYCLES)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / batch)
    return statistics.median(times)


def host_us(fn, calls: int = 50) -> float:
    """Host microseconds per ``fn()`` call (launches only: the GPU runs behind, synchronised after)."""
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def best_sdpa(q4, k, v, scale: float, primed: bool, log: list[str], where: str = "") -> tuple[float, str]:
    """(median ms, kernel name) of torch's best SDPA kernel, flash or cuDNN, on these tensors (GQA):
    the baseline every GPU report compares with. A kernel that refuses the shape is logged."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best, which = float("inf"), ""
    for name, kern in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(kern):
                ms = timed(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True),
                           primed=primed)
        except RuntimeError as exc:
            log.append(f"sdpa {name} failed{where}: {exc}".splitlines()[0])
            continue
        if ms < best:
            best, which = ms, name
    return best, which
