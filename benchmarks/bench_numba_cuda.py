"""Numba CUDA backend on a GPU: correctness against the NumPy reference, then timings against baselines.

Baselines are measured in the same process on the same card: a device-to-device copy moving the
same bytes as each encode/decode (bytes read + bytes written), and bf16
``torch.nn.functional.scaled_dot_product_attention`` decode at B=8, T=32768, 32 query / 8 KV heads,
d=128 (the best of its flash and cuDNN kernels). Timing on random data after warm-up: encode/decode
``triton.testing.do_bench`` medians; attention through the public API (torch tensors in and out),
CUDA events around back-to-back calls as in a decode loop (``timing.timed``), plus the GPU time per
call (kernel durations from CUPTI), which leaves out host launch work.

Usage: ``python benchmarks/bench_numba_cuda.py [--out results.md] [--attention-only]``; prints the
table last. ``--attention-only`` (~2 minutes with Numba JIT) skips encode/decode and times every
attention kernel variant of ``VARIANTS`` at 3.5 and 4 bits, each checked against the float64 NumPy
reference first, with SDPA measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import torch
import triton.testing
from timing import timed

import turboquant_codec as tq
from turboquant_codec import tuning
from turboquant_codec.backends import numba_cuda as nc
from turboquant_codec.backends import numba_warp_attention as nw
from turboquant_codec.backends import numpy_ref
from turboquant_codec.config import CodecConfig

# Vectors per encode/decode timing: 1M x d=128 fp16 is 256 MiB, far beyond the 50 MiB L2.
N_VECTORS = 1 << 20
D = 128
# Attention decode shape of the baseline (GPU.md).
B, T, H_Q, H_KV = 8, 32768, 32, 8
# Vectors checked against the float64 reference (the reference is slow on the host).
N_CHECK = 1 << 15


def median_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def gpu_ms(fn, calls: int = 10) -> float:
    """GPU time of one call: the CUDA kernels' durations (CUPTI, torch.profiler) summed over
    ``calls`` calls, divided by ``calls``. Unlike ``median_ms`` it leaves out the host work between
    launches, which for Numba's launch path exceeds the kernels' time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(getattr(e, "device_time", None) or e.cuda_time for e in kernels) / calls / 1e3


def copy_ms(total_bytes: int) -> float:
    """A device-to-device copy whose bytes read + written equal ``total_bytes``."""
    src = torch.randint(0, 255, (total_bytes // 2,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src))


def kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
    x[..., :4] *= 8.0  # a few outlier channels, as real keys have
    return x.to(dtype)


def check_codec(cfg: CodecConfig) -> str:
    x = kv((2, N_CHECK // 2, cfg.d), torch.float16, 1)
    host = x.cpu().numpy()
    ref = tq.encode(host, bits=cfg.bits, mode=cfg.mode, seed=cfg.seed, backend="numpy")
    got = tq.encode(x, bits=cfg.bits, mode=cfg.mode, seed=cfg.seed, backend="numba_cuda")
    rec = got.records.cpu().numpy()
    mismatch = max(np.mean(numpy_ref._codes(rec, g) != numpy_ref._codes(ref.records, g)) for g in cfg.groups)
    want = tq.decode(ref, backend="numpy")
    back = tq.decode(tq.Encoded(torch.from_numpy(ref.records).cuda(),
                                None if ref.channels is None else torch.from_numpy(
                                    ref.channels.astype(np.int32)).cuda(), ref.config),
                     backend="numba_cuda").cpu().numpy()
    err = float(np.abs(back - want).max() / np.abs(want).max())
    assert mismatch <= 1e-3 and err <= 2e-5, (mismatch, err)
    return f"codes differ {mismatch:.2e}, decode max rel err {err:.1e}"


def check_attention(bits: float = 3.5) -> float:
    """Max relative error of the current attention kernel against the float64 NumPy reference."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, H_KV, 2048, D)).astype(np.float32)
    v = rng.standard_normal((1, H_KV, 2048, D)).astype(np.float32)
    q = rng.standard_normal((1, H_Q, D)).astype(np.float32)
    k_enc, v_enc = tq.encode(k, bits=bits, seed=1), tq.encode(v, bits=bits, seed=2)
    want = tq.attention(q, k_enc, v_enc, scale=D**-0.5, backend="numpy")

    def dev(e: tq.Encoded) -> tq.Encoded:
        ch = None if e.channels is None else torch.from_numpy(e.channels.astype(np.int32)).cuda()
        return tq.Encoded(torch.from_numpy(e.records).cuda(), ch, e.config)

    got = tq.attention(torch.from_numpy(q).cuda(), dev(k_enc), dev(v_enc), scale=D**-0.5,
                       backend="numba_cuda").cpu().numpy()
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= 1e-4, (bits, err)
    return err


def bench_codec(cfg: CodecConfig, rows: list[tuple[str, ...]]) -> None:
    x = kv((N_VECTORS, cfg.d), torch.float16, 2)
    xa = nc.asarray(x)
    records, channels = nc.encode(xa, cfg, None)  # warm-up; fixes the outlier channels
    enc_ms = median_ms(lambda: nc.encode(xa, cfg, channels))
    enc = tq.Encoded(records=records, channels=channels, config=cfg)
    dec_ms = median_ms(lambda: nc.decode(enc))
    enc_bytes = N_VECTORS * (2 * cfg.d + cfg.record_bytes)
    dec_bytes = N_VECTORS * (cfg.record_bytes + 4 * cfg.d)
    for op, ms, nbytes in (("encode", enc_ms, enc_bytes), ("decode", dec_ms, dec_bytes)):
        base = copy_ms(nbytes)
        rows.append((f"{op} {cfg.mode} {cfg.bits:g}b fp16 N=2^20 d={cfg.d}", f"{ms:.3f}",
                     f"copy {base:.3f}", f"{nbytes / ms / 1e6:.0f} GB/s", f"{100 * base / ms:.0f}% of copy"))
        print(rows[-1], flush=True)


def _set_variant(variant: dict) -> None:
    """Put the warp attention's compile options in force (its kernels are cached per settings)."""
    settings = tuning.NumbaCudaTuning(attn_prefetch=variant["prefetch"],
                                      attn_max_registers=variant["max_registers"])
    tuning.use(dataclasses.replace(tuning.current(), numba_cuda=settings))


def bench_attention(bits: float, rows: list[tuple[str, ...]]) -> None:
    """Every variant of ``VARIANTS``: reference check, registers, time per call through the public
    API (torch in, torch out) over back-to-back calls, GPU time; SDPA (best of flash and cuDNN) in
    the same run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kb = kv((B, H_KV, T, D), torch.bfloat16, 3)
    vb = kv((B, H_KV, T, D), torch.bfloat16, 4)
    q = kv((B, H_Q, D), torch.bfloat16, 5)
    k_enc = tq.encode(kb, bits=bits, seed=1, backend="numba_cuda")
    v_enc = tq.encode(vb, bits=bits, seed=2, backend="numba_cuda")
    scale = D**-0.5
    q4 = q.view(B, H_Q, 1, D)

    def sdpa_call():
        return torch.nn.functional.scaled_dot_product_attention(q4, kb, vb, scale=scale, enable_gqa=True)

    def ours_call():
        return tq.attention(q, k_enc, v_enc, scale=scale, backend="numba_cuda", check_finite=False)

    sdpa = {}
    for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel(kernel):
            sdpa[kernel.name] = (timed(sdpa_call), gpu_ms(sdpa_call))
    best = min(sdpa, key=lambda name: sdpa[name][0])
    sdpa_ms, sdpa_gpu = sdpa[best]
    read = 2 * B * H_KV * T * k_enc.config.record_bytes
    for variant in VARIANTS:
        _set_variant(variant)
        err = check_attention(bits)  # compiles this variant, checks it against the float64 reference
        ours_call()
        kern, warps = nw.fast_attention_kernel(k_enc.config, v_enc.config, H_Q // H_KV)
        regs = kern.get_regs_per_thread()
        regs = max(regs.values()) if isinstance(regs, dict) else regs
        ours, ours_gpu = timed(ours_call), gpu_ms(ours_call)
        name = f"prefetch={variant['prefetch']} max_registers={variant['max_registers']}"
        rows.append((f"attention mse {bits:g}b B={B} T={T} {H_Q}/{H_KV} heads d={D} ({name})",
                     f"{ours:.3f} (GPU {ours_gpu:.3f})",
                     f"SDPA bf16 {best.split('_')[0].lower()} {sdpa_ms:.3f} (GPU {sdpa_gpu:.3f})",
                     f"{read / ours / 1e6:.0f} GB/s records",
                     f"**{sdpa_ms / ours:.2f}x SDPA**, GPU time {sdpa_gpu / ours_gpu:.2f}x ({regs} regs, "
                     f"{warps} warps/block, ref err {err:.1e})"))
        print(rows[-1], flush=True)


# Warp attention variants timed against each other (the first is the module default). Registers
# per thread set the resident warps per SM (65536 / (32 * regs), in blocks of 4 warps): the
# compiler's choice is 95 (3.5b) / 72 (4b) without prefetch, ~128 with it; a cap of 72 spills
# nothing (28 warps per SM), 64 spills a little at 3.5 bits (32 warps per SM).
VARIANTS: list[dict] = [
    {"prefetch": False, "max_registers": None},
    {"prefetch": True, "max_registers": None},
    {"prefetch": False, "max_registers": 72},
    {"prefetch": False, "max_registers": 64},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_numba_cuda.md")
    parser.add_argument("--attention-only", action="store_true", help="skip encode/decode (short runs)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated indices into VARIANTS to time (default: all; 0 = default)")
    args = parser.parse_args()
    global VARIANTS
    if args.variants is not None:
        VARIANTS = [VARIANTS[int(i)] for i in args.variants.split(",")]
    print(nc.availability(), torch.cuda.get_device_name())
    codecs = () if args.attention_only else ((3.5, "mse"), (4.0, "mse"), (3.5, "prod"))
    checks = [check_codec(CodecConfig(D, b, m, 7)) for b, m in codecs]
    checks.append(f"attention max rel err {check_attention():.1e}")
    rows: list[tuple[str, ...]] = []
    for bits, mode in codecs:
        bench_codec(CodecConfig(D, bits, mode, 7), rows)
    for bits in (3.5, 4.0):
        bench_attention(bits, rows)
    head = ("op", "median ms", "baseline ms", "throughput", "ratio")
    lines = [f"card: {torch.cuda.get_device_name()}", "", "checks: " + "; ".join(checks), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    with open(args.out, "w") as fh:
        fh.write(text + "\n")
    print(text)
    assert math.isfinite(float(rows[0][1]))


if __name__ == "__main__":
    main()
