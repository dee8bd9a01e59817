"""CuPy RawModule backend on one GPU: correctness first, then timings against bf16 SDPA, one process.

1. Checks: cupy_raw attention and encode against the NumPy reference on fresh random data.
2. Copy bandwidth (device-to-device, bytes read + written) measured in this run.
3. Decode attention, 32 query / 8 KV heads, d=128, K and V compressed (mse) at 3.5 and 2.5 bits, at
   (B=8, T=32k), (B=1, T=128k), (B=32, T=8k): cupy_raw vs torch SDPA in bf16 (best of the flash and
   cuDNN kernels) vs the numba_cuda backend when available. Achieved GB/s of compressed bytes.
4. Encode throughput (bf16 in, records out; GB/s read + written) vs copy bandwidth: the tensor-core
   kernel (tq_encode_tc) and the scalar one (tq_encode, encode_path "scalar"), same run,
   after checking both against the reference for every input dtype at d=64/128, 2.5/3.5/4 bits.
   ``--encode-only``: only the encode checks, copy bandwidth and encode timings (3 shapes x 3 bits),
   also as kernel time alone (``timing.timed(primed=True)``) and host time per call.

Timing: CUDA events around each call after warm-up (kernels compiled outside timed regions), median
of repeats; inputs far larger than L2. Prints a table last and writes markdown (``--out``).

Usage: python benchmarks/bench_cupy_raw.py [--out benchmarks/RESULTS-cupy_raw.md] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
from timing import best_sdpa, host_us, timed

import turboquant_codec as tq
from turboquant_codec import tuning
from turboquant_codec.backends import availability, cupy_raw, cupy_raw_tc

H_Q, H_KV, D = 32, 8, 128
SCALE = D**-0.5
SHAPES = ((8, 32768), (1, 131072), (32, 8192))
BITS = (3.5, 2.5)


def _vname(var: tuple[int, int, int]) -> str:
    return "w{}s{}b{}".format(*var)


def _set(**changes: object) -> None:
    """Put these cupy_raw settings in force (builds and plans are cached per settings object)."""
    now = tuning.current()
    tuning.use(dataclasses.replace(now, cupy_raw=dataclasses.replace(now.cupy_raw, **changes)))


def use_variant(var: tuple[int, int, int]) -> None:
    """Set the split kernel's launch shape (warps per block, ring stages, min blocks per SM)."""
    _set(attn_warps=var[0], attn_stages=var[1], attn_minblocks=var[2])


def set_encode_path(path: str) -> None:
    """Which encode kernel runs: "auto" (tensor cores where they serve) or "scalar"."""
    _set(encode_path=path)


def check_correctness() -> list[str]:
    import cupy as cp

    lines = []
    rng = np.random.default_rng(int(time.time()))
    for bits in BITS:
        k = rng.standard_normal((2, H_KV, 1000, D)).astype(np.float32)
        k[..., rng.choice(D, 4, replace=False)] *= 8
        v = rng.standard_normal((2, H_KV, 1000, D)).astype(np.float32)
        q = rng.standard_normal((2, H_Q, D)).astype(np.float32)
        kt, vt = (rng.standard_normal((2, H_KV, 7, D)).astype(np.float32) for _ in range(2))
        ke = tq.encode(cp.asarray(k), bits=bits, seed=1, backend="cupy_raw")
        ve = tq.encode(cp.asarray(v), bits=bits, seed=2, backend="cupy_raw")
        kr = tq.encode(k, bits=bits, seed=1, backend="numpy")
        mism = float(np.mean(cp.asnumpy(ke.records) != kr.records))
        host = [tq.Encoded(cp.asnumpy(e.records), cp.asnumpy(e.channels), e.config) for e in (ke, ve)]
        want = tq.attention(q, *host, scale=D**-0.5, k_tail=kt, v_tail=vt, backend="numpy")
        got = cp.asnumpy(tq.attention(cp.asarray(q), ke, ve, scale=D**-0.5, k_tail=cp.asarray(kt),
                                      v_tail=cp.asarray(vt), backend="cupy_raw"))
        err = float(np.max(np.abs(got - want)))
        ok = err < 1e-4 * np.sqrt(D) and mism < 1e-2
        lines.append(f"check bits={bits}: attention max|err|={err:.2e}, record bytes differing "
                     f"from reference {mism:.2e} -> {'OK' if ok else 'FAIL'}")
        if not ok:
            raise SystemExit("\n".join(lines))
    return lines


def check_encode(dims: tuple[int, ...] = (64, 128)) -> list[str]:
    """Both encode kernels against the NumPy reference, per input dtype and bits (fields as in
    tests/test_backends.py: codes may differ on at most 1e-3 of coordinates, norms by 1 ulp)."""
    import torch

    from turboquant_codec.backends import numpy_ref
    from turboquant_codec.config import CodecConfig

    lines = []
    rng = np.random.default_rng(int(time.time()))
    for d in dims:
        for bits in (2.5, 3.5, 4.0):
            x32 = rng.standard_normal((4, 3001, d)).astype(np.float32)
            x32[..., rng.choice(d, 4, replace=False)] *= 8
            x32 *= rng.uniform(1e-2, 1e2, (4, 3001, 1)).astype(np.float32)
            for dtype in ("bfloat16", "float16", "float32"):
                xt = torch.from_numpy(x32).to("cuda", getattr(torch, dtype))
                host = xt.float().cpu().numpy()
                ref = tq.encode(host, bits=bits, seed=3, backend="numpy")
                cfg = CodecConfig(d, bits, seed=3)
                ch = None if ref.channels is None else cupy_raw._cupy().asarray(ref.channels)
                worst = {}
                for path in ("scalar", "auto"):
                    set_encode_path(path)
                    rec, _ = cupy_raw.encode(cupy_raw.asarray(xt), cfg, ch)
                    got = cupy_raw._cupy().asnumpy(rec)
                    mism = max(float(np.mean(numpy_ref._codes(got, g) != numpy_ref._codes(ref.records, g)))
                               for g in cfg.groups)
                    nerr = max(float(np.max(np.abs(numpy_ref._norms(got, g, 0) / np.maximum(
                        numpy_ref._norms(ref.records, g, 0), 1e-30) - 1))) for g in cfg.groups)
                    worst[path] = (mism, nerr)
                set_encode_path("auto")
                ok = all(m <= 1e-3 and e <= 2**-10 for m, e in worst.values())
                tc = "tc" if cupy_raw_tc.tc_encode_ok(cfg) else "scalar only"
                lines.append(f"encode check d={d} bits={bits} {dtype} ({tc}): code mismatch tc/auto "
                             f"{worst['auto'][0]:.1e} scalar {worst['scalar'][0]:.1e}, norm rel err "
                             f"{worst['auto'][1]:.1e} -> {'OK' if ok else 'FAIL'}")
                if not ok:
                    raise SystemExit("\n".join(lines))
    return lines


def main() -> None:
    import cupy as cp
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-numba", action="store_true", help="skip the (slow) numba_cuda comparison")
    ap.add_argument("--variants", default="",
                    help="extra split-kernel launch shapes 'warps,stages,minblocks ...' timed (and checked) "
                         "after the library default")
    ap.add_argument("--encode-only", action="store_true",
                    help="checks, copy bandwidth and encode timings only (no attention)")
    args = ap.parse_args()
    status = availability("cupy_raw")
    if not status:
        raise SystemExit(f"cupy_raw unavailable: {status.reason}")
    torch.cuda.init()
    card = torch.cuda.get_device_name()
    now = tuning.current().cupy_raw
    default = (now.attn_warps, now.attn_stages, now.attn_minblocks)
    variants = [default] + [tuple(int(x) for x in v.split(",")) for v in args.variants.split()]
    log = [f"card: {card}"]
    for var in [] if args.encode_only else variants:
        use_variant(var)
        log += [f"[{_vname(var)}] {line}" for line in check_correctness()]
    use_variant(default)
    log += check_encode((128,) if args.encode_only else (64, 128))  # --encode-only: timed d
    print("\n".join(log), flush=True)
    if args.encode_only:
        enc_only(log)
        return

    # Copy bandwidth: 1 GiB device-to-device, read + written.
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timed(lambda a=src, b=dst: b.copy_(a), reps=10, batch=3)
    copy_gbs = 2 * src.numel() / ms / 1e6
    del src, dst
    log.append(f"copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    print(log[-1], flush=True)

    numba_ok = bool(availability("numba_cuda")) and not args.no_numba
    rows = []
    var_rows = []
    enc_rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    for b, t in shapes:
        gen = torch.Generator(device="cuda").manual_seed(b * t)
        k = torch.randn(b, H_KV, t, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(b, H_KV, t, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        q = torch.randn(b, H_Q, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        q4 = q[:, :, None, :]
        sdpa, which = best_sdpa(q4, k, v, SCALE, False, log, f" at B={b} T={t}")
        for bits in BITS:
            ke = tq.encode(k, bits=bits, seed=1, backend="cupy_raw")
            ve = tq.encode(v, bits=bits, seed=2, backend="cupy_raw")
            kc = cupy_raw.asarray(ke.records)
            native = [tq.Encoded(cupy_raw.asarray(e.records), cupy_raw.asarray(e.channels), e.config)
                      for e in (ke, ve)]
            qc = cupy_raw.asarray(q)
            ms_var = {}
            for var in variants:
                use_variant(var)
                ms_var[var] = timed(
                    lambda native=native, qc=qc: cupy_raw.attention(qc, *native, SCALE, None, None)
                )
            use_variant(default)
            ms_tq = ms_var[default]
            nbytes = 2 * kc.nbytes + 2 * (ke.channels.numel() * 2)
            ms_nb = None
            if numba_ok:
                try:
                    def numba_call(ke=ke, ve=ve, q=q):
                        return tq.attention(q, ke, ve, scale=SCALE, backend="numba_cuda", check_finite=False)

                    ms_nb = timed(numba_call, reps=5, warmup=2)
                except Exception as exc:  # the teammate's backend may not serve this shape
                    log.append(f"numba_cuda failed at B={b} T={t} bits={bits}: {type(exc).__name__}: {exc}")
            rows.append((b, t, bits, ms_tq, sdpa, which, ms_nb, nbytes / ms_tq / 1e6, copy_gbs))
            var_rows.append((b, t, bits, sdpa, ms_var))
            print(rows[-1], flush=True)
            # Encode throughput with fixed channels (selection excluded): bf16 read + records written.
            kn = cupy_raw.asarray(k)
            chn = cupy_raw.asarray(ke.channels)
            enc_bytes = k.numel() * 2 + kc.nbytes
            ms_path = {}
            for path in ("scalar", "auto"):  # tq_encode vs tq_encode_tc (where tc_encode_ok)
                set_encode_path(path)
                ms_path[path] = timed(lambda kn=kn, chn=chn, cfg=ke.config: cupy_raw.encode(kn, cfg, chn),
                                      reps=5, batch=10)
            set_encode_path("auto")
            ms_enc = ms_path["auto"]
            enc_rows.append((b, t, bits, ms_enc, enc_bytes / ms_enc / 1e6, copy_gbs, ms_path["scalar"]))
            del ke, ve, native, kc
        del k, v, q
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()

    md = [f"# cupy_raw benchmark ({card})", "", *[f"- {line}" for line in log], "",
          "## Decode attention (32 q heads / 8 KV heads, d=128, K and V mse, no tail)", "",
          "| B | T | bits | cupy_raw ms | bf16 SDPA ms (kernel) | speedup | numba_cuda ms | "
          "compressed GB/s | % of copy |",
          "|---|---|---|---|---|---|---|---|---|"]
    for b, t, bits, ms_tq, ms_sd, which, ms_nb, gbs, cgbs in rows:
        nb = f"{ms_nb:.3f}" if ms_nb is not None else ("not run" if not numba_ok else "failed")
        md.append(f"| {b} | {t} | {bits:g} | {ms_tq:.4f} | {ms_sd:.4f} ({which}) | {ms_sd / ms_tq:.2f}x | "
                  f"{nb} | {gbs:.0f} | {100 * gbs / cgbs:.0f}% |")
    if len(variants) > 1:
        md += ["",
               "## Split-kernel launch shapes (warps/block, cp.async stages, min blocks/SM), same run", "",
               "| B | T | bits | " + " | ".join(_vname(v) + " ms" for v in variants) + " |",
               "|---|---|---|" + "---|" * len(variants)]
        for b, t, bits, ms_sd, ms_var in var_rows:
            md.append(f"| {b} | {t} | {bits:g} | " + " | ".join(
                f"{ms_var[v]:.4f} ({ms_sd / ms_var[v]:.2f}x)" for v in variants) + " |")
    md += ["", "## Encode (bf16 in, records out, channels given)", "",
           "| B*h_kv | T | bits | tensor-core ms | GB/s (read+write) | % of copy | scalar ms | % of copy |",
           "|---|---|---|---|---|---|---|---|"]
    for b, t, bits, ms, gbs, cgbs, ms_sc in enc_rows:
        md.append(f"| {b * H_KV} | {t} | {bits:g} | {ms:.3f} | {gbs:.0f} | {100 * gbs / cgbs:.0f}% | "
                  f"{ms_sc:.3f} | {100 * gbs * ms / ms_sc / cgbs:.0f}% |")
    if not numba_ok:
        why = "--no-numba" if args.no_numba else availability("numba_cuda").reason
        md.append(f"\nnumba_cuda not run: {why}")
    text = "\n".join(md) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    sys.stdout.flush()


def enc_only(log: list[str]) -> None:
    """Encode (bf16 in, channels given) of the three attention shapes' K, both kernels, vs copy."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timed(lambda a=src, b=dst: b.copy_(a), reps=10, batch=3)
    ms_primed = timed(lambda a=src, b=dst: b.copy_(a), reps=10, batch=3, primed=True)
    copy_gbs, copy_primed = 2 * src.numel() / ms / 1e6, 2 * src.numel() / ms_primed / 1e6
    del src, dst
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s (read + write); primed: {copy_primed:.0f} GB/s")
    print("| B*h_kv | T | bits | tensor-core ms | % of copy | kernel only ms | % of copy | host us/call | "
          "scalar ms | % of copy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, t in SHAPES:
        k = torch.randn(b, H_KV, t, D, device="cuda", dtype=torch.bfloat16)
        for bits in (3.5, 2.5, 4.0):
            ke = tq.encode(k, bits=bits, seed=1, backend="cupy_raw")
            kn, chn = cupy_raw.asarray(k), None if ke.channels is None else cupy_raw.asarray(ke.channels)
            nbytes = k.numel() * 2 + ke.records.numel()

            def call(kn=kn, chn=chn, cfg=ke.config):
                return cupy_raw.encode(kn, cfg, chn)

            res = {}
            for path in ("auto", "scalar"):
                set_encode_path(path)
                # 10 back-to-back calls per event pair: the host's time per call overlaps the GPU,
                # as in a prefill loop.
                res[path] = timed(call, reps=15, batch=10)
            set_encode_path("auto")
            res["kernel"] = timed(call, reps=15, batch=10, primed=True)
            base = {"auto": copy_gbs, "scalar": copy_gbs, "kernel": copy_primed}
            pct = {p: 100 * nbytes / m / 1e6 / base[p] for p, m in res.items()}
            print(f"| {b * H_KV} | {t} | {bits:g} | {res['auto']:.4f} | {pct['auto']:.1f}% | "
                  f"{res['kernel']:.4f} | {pct['kernel']:.1f}% | {host_us(call):.0f} | "
                  f"{res['scalar']:.3f} | {pct['scalar']:.0f}% |", flush=True)
            del ke
        del k


if __name__ == "__main__":
    main()
