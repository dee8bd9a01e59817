"""Timing shared by the benchmark scripts: CUDA events around back-to-back calls, medians."""

from __future__ import annotations

import statistics


def timed(fn, reps: int = 30, warmup: int = 5, batch: int = 10) -> float:
    """Median milliseconds of ``fn()`` on torch's current stream (CUDA events around ``batch``
    back-to-back calls, so Python launch overhead overlaps GPU work as in a decode loop)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / batch)
    return statistics.median(times)
