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
