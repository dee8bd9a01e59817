"""Host time of ``tq.attention`` through the public API on torch CUDA tensors, against bf16 SDPA.

One process, one card. For each shape (32 query / 8 KV heads, d=128, K and V mse, bf16 torch
tensors, ``check_finite=False``, no tail), after a check against the NumPy reference:

1. **host us/call**: ``perf_counter`` around 50 back-to-back calls while a sleep kernel holds the
   stream, so the GPU never waits for the host and never makes the host wait (the launch queue
   stays short of full): the time the host spends per call. Median of 7 repeats.
2. **back-to-back ms**: CUDA events around 10 back-to-back public calls, median of 30 repeats
   (``timing.timed``): what a decode loop without graphs gets. Host time above the kernels' time
   shows here.
3. **kernel ms**: the same calls with a sleep kernel ahead of the first event (``timed(primed=True)``):
   all calls are queued before the GPU reaches them, so the figure is GPU time alone.
4. **bf16 SDPA**: ``scaled_dot_product_attention`` (GQA), best of flash and cuDNN, timed both ways.

``--profile``: where the host time goes, at the first shape. Stage by stage (``perf_counter`` around
200 calls of each stage alone: dispatch, the query's conversion, the keys'/values' conversion, the
backend call, the hand-back), cProfile's top functions over 2,000 calls, and the cost of single
interop primitives (CuPy/torch array exchange, allocation, stream lookup, an empty kernel's launch).
Works on any version of the library (stages missing from a version are left out).

Usage: python benchmarks/bench_host.py [--profile] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from timing import best_sdpa, timed

import turboquant_codec as tq

H_Q, H_KV, D = 32, 8, 128
SCALE = D**-0.5
SHAPES = ((8, 32768), (1, 131072), (32, 8192))
BITS = 3.5
# Sleep-kernel cycles held ahead of a host-time measurement (~25 ms at H100/H200 clocks): longer than
# the host needs to queue a batch, even at the old ~0.5 ms per call.
HOLD_CYCLES = 50_000_000


def host_us(fn: Callable[[], Any], calls: int = 50, repeats: int = 7) -> float:
    """Median host microseconds per ``fn()`` over ``repeats`` batches of ``calls`` back-to-back calls,
    each batch queued behind a sleep kernel (the GPU stays busy, the host never waits for it)."""
    import torch

    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        torch.cuda._sleep(HOLD_CYCLES)
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter_ns() - t0) / calls / 1e3)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def sdpa_ms(q4: Any, k: Any, v: Any, primed: bool, log: list[str]) -> tuple[float, str]:
    return best_sdpa(q4, k, v, SCALE, primed, log)


def check(ke: tq.Encoded, ve: tq.Encoded, q: Any) -> float:
    """max |public API on torch - NumPy reference| over a slice of the batch (first 2 sequences)."""
    host = [tq.Encoded(e.records[:2].cpu().numpy(), e.channels[:2].cpu().numpy(), e.config)
            for e in (ke, ve)]
    want = tq.attention(q[:2].float().cpu().numpy(), *host, scale=SCALE, backend="numpy")
    sub = [tq.Encoded(e.records[:2], e.channels[:2], e.config) for e in (ke, ve)]
    got = tq.attention(q[:2], *sub, scale=SCALE, check_finite=False).cpu().numpy()
    return float(np.max(np.abs(got - want)))


def stages(q: Any, ke: tq.Encoded, ve: tq.Encoded) -> dict[str, Callable[[], Any]]:
    """The public call and its stages, each callable alone (as this version of the library has them)."""
    from turboquant_codec import _interop, api

    def public() -> Any:
        return tq.attention(q, ke, ve, scale=SCALE, check_finite=False)

    if hasattr(api, "_dispatch"):
        def dispatch() -> Any:
            return api._dispatch.backend("attention", "auto", ke.records, (ke.config, ve.config),
                                         _interop.dtype_name(q))
    else:  # before _dispatch: the API resolved the backend itself
        def dispatch() -> Any:
            return api._backend("attention", "auto", ke.records, (ke.config, ve.config),
                                _interop.dtype_name(q))

    module = dispatch()
    qn = module.asarray(q)
    kn, vn = api._native(module, ke), api._native(module, ve)
    out = module.attention(qn, kn, vn, SCALE, None, None)
    hand_back = getattr(_interop, "backend_result", _interop.like)
    return {
        "public call": public,
        "dispatch": dispatch,
        "asarray(q)": lambda: module.asarray(q),
        "native K and V": lambda: (api._native(module, ke), api._native(module, ve)),
        "backend attention": lambda: module.attention(qn, kn, vn, SCALE, None, None),
        "hand-back": lambda: hand_back(out, q),
    }


def primitives(q: Any, out_cupy: Any) -> dict[str, Callable[[], Any]]:
    """Single interop operations a call may be made of, for comparison."""
    import cupy as cp
    import torch

    code = r'extern "C" __global__ void noop12(const void* a, const void* b, const void* c, float s, ' \
           r'void* d, void* e, void* f, const void* g, const void* h, int n, int m, int k) {}'
    noop = cp.RawKernel(code, "noop12")
    fn = noop.kernel
    buf = cp.empty((1 << 20,), cp.uint8)
    ptr = buf.data
    args = (buf, buf, buf, np.float32(1.0), ptr + 256, ptr + 512, ptr + 1024, buf, buf,
            np.int32(1), np.int32(2), np.int32(3))
    dev = q.get_device()
    ext = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream, dev)
    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

    def device_context() -> None:
        with cp.cuda.Device(dev):
            pass

    def stream_context() -> None:
        with ext:
            pass

    prims: dict[str, Callable[[], Any]] = {
        "cupy.asarray(torch q) [CAI]": lambda: cp.asarray(q.view(torch.int16)),
        "cupy.from_dlpack(torch q)": lambda: cp.from_dlpack(q.view(torch.int16)),
        "cupy view from data_ptr": lambda: cp.ndarray(
            tuple(q.shape), np.uint16,
            cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(q.data_ptr(), q.numel() * 2, q, dev), 0)),
        "torch.from_dlpack(cupy out)": lambda: torch.from_dlpack(out_cupy),
        "torch.as_tensor(cupy out) [CAI]": lambda: torch.as_tensor(out_cupy),
        "cupy.empty (pool)": lambda: cp.empty((4096,), cp.float32),
        "torch.empty (caching allocator)": lambda: torch.empty((4096,), dtype=torch.float32, device=q.device),
        "torch.cuda.current_stream()": lambda: torch.cuda.current_stream(dev),
        "with cupy.cuda.Device": device_context,
        "with ExternalStream": stream_context,
        "RawKernel launch, 12 args": lambda: noop((1,), (32,), args),
        "Function launch, 12 args": lambda: fn((1,), (32,), args),
    }
    if raw_stream is not None:
        prims["torch._C._cuda_getCurrentRawStream"] = lambda: raw_stream(dev)
    return prims


def profile(q: Any, ke: tq.Encoded, ve: tq.Encoded) -> list[str]:
    lines = ["", "## Where the host time goes (B, T of the first shape; us per call, GPU kept busy)", "",
             "| stage | host us |", "|---|---|"]
    st = stages(q, ke, ve)
    for name, fn in st.items():
        lines.append(f"| {name} | {host_us(fn, calls=200, repeats=5):.1f} |")
    out_cupy = st["backend attention"]()
    lines += ["", "| primitive | host us |", "|---|---|"]
    for name, fn in primitives(q, out_cupy).items():
        try:
            lines.append(f"| {name} | {host_us(fn, calls=200, repeats=5):.2f} |")
        except Exception as exc:  # a primitive this stack lacks
            lines.append(f"| {name} | failed: {type(exc).__name__}: {exc} |".splitlines()[0])
    public = st["public call"]
    for _ in range(20):
        public()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        public()
    prof.disable()
    import torch

    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(22)
    body = text.getvalue()
    lines += ["", "cProfile, 2,000 public calls, sorted by own time (cProfile inflates small calls):", "",
              "```", *[ln for ln in body.splitlines() if ln.strip()][-24:], "```"]
    return lines


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the first shape only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.cuda.init()
    card = torch.cuda.get_device_name()
    log: list[str] = [f"card: {card}", f"torch {torch.__version__}", f"library: {tq.__file__}"]
    rows = []
    prof_lines: list[str] = []
    for b, t in SHAPES[:1] if args.quick else SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(b * t)
        k = torch.randn(b, H_KV, t, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(b, H_KV, t, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        q = torch.randn(b, H_Q, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        ke = tq.encode(k, bits=BITS, seed=1, check_finite=False)
        ve = tq.encode(v, bits=BITS, seed=2, check_finite=False)
        err = check(ke, ve, q)
        log.append(f"B={b} T={t}: max|public API - NumPy reference| = {err:.2e} "
                   f"-> {'OK' if err < 1e-2 else 'FAIL'}")
        print(log[-1], flush=True)
        if err >= 1e-2:
            raise SystemExit("\n".join(log))

        def call(q=q, ke=ke, ve=ve) -> Any:
            return tq.attention(q, ke, ve, scale=SCALE, check_finite=False)

        q4 = q[:, :, None, :]
        sd_b2b, which = sdpa_ms(q4, k, v, False, log)
        sd_kern, _ = sdpa_ms(q4, k, v, True, log)
        out = torch.empty(b, H_Q, D, device="cuda")

        def call_out(q=q, ke=ke, ve=ve, out=out) -> Any:  # out= given: repeats replay (tq._replay)
            return tq.attention(q, ke, ve, scale=SCALE, check_finite=False, out=out)

        b2b = timed(call)
        kern = timed(call, primed=True)
        host = host_us(call)
        b2b_out, host_out = timed(call_out), host_us(call_out)
        rows.append((b, t, host, b2b, kern, sd_b2b, sd_kern, which, host_out, b2b_out))
        print(rows[-1], flush=True)
        if args.profile and not prof_lines:
            prof_lines = profile(q, ke, ve)
            print("\n".join(prof_lines), flush=True)
        del k, v, q, q4, ke, ve
        torch.cuda.empty_cache()
    md = [f"# bench_host ({card})", "", *[f"- {line}" for line in log], "",
          f"## tq.attention, public API, torch bf16 tensors, {BITS:g} bits, check_finite=False "
          "(32 q / 8 KV heads, d=128)", "",
          "| B | T | host us/call | back-to-back ms | kernel ms | bf16 SDPA back-to-back ms | "
          "SDPA kernel ms | back-to-back vs SDPA | kernel vs SDPA | with out=: host us/call | "
          "with out=: back-to-back ms |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b, t, host, b2b, kern, sd_b2b, sd_kern, which, host_out, b2b_out in rows:
        md.append(f"| {b} | {t} | {host:.1f} | {b2b:.4f} | {kern:.4f} | {sd_b2b:.4f} ({which}) | "
                  f"{sd_kern:.4f} | **{sd_b2b / b2b:.2f}x** | {sd_kern / kern:.2f}x | {host_out:.1f} | "
                  f"{b2b_out:.4f} |")
    md += prof_lines
    text = "\n".join(md) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
