"""Paged decode on one GPU: cupy_raw's fused paged kernels against bf16 SDPA on contiguous K/V, one process.

Setup per shape (B requests of T context tokens, 32 query / 8 KV heads, d=128, block size 16, K and V
mse at 3.5 bits, or ``--bits K,V``): vLLM's packed cache ``[num_blocks, 8, 16, R_k + R_v]`` uint8
(torch) seen through its transposed views, a random permutation of the blocks as block table, filled by
``cupy_raw.paged_write``; a raw pool holding each request's first block (4 sinks) and the blocks of
its last 128 tokens (the new token's block included), bf16.

Timed (CUDA events, medians; ``timing.timed``):

1. Kernel: ``cupy_raw.paged_attention`` on the backend's own arrays with ``num_decodes=B``, primed
   (a sleep kernel ahead, so the figure is GPU time alone), against bf16 SDPA (best of flash and
   cuDNN) on contiguous ``[B, 8, T, 128]`` K/V, same run.
2. The public API with torch tensors (``tq.paged_attention``), back-to-back, not primed; host
   microseconds per call (``timing.host_us``), backend call and public API.
3. A 32-layer decode step captured in one torch CUDA graph: per layer ``paged_write`` of the new token
   beside ``paged_attention`` (``turboquant_torch.write_beside``, as the vLLM plugin runs them; also
   timed in order, write then attention), both through the public API, against per layer the new
   token's K/V copied into a contiguous bf16 cache + SDPA, also captured; and attention alone (32
   paged_attention vs 32 SDPA).
   All 32 layers read one cache (hundreds of MB, far over L2, so no layer finds the previous one's
   bytes in L2).
4. Transient memory of a decode call: cupy_paged's scratch (partials, query copies) in bytes.

Usage: python benchmarks/bench_paged.py [--out benchmarks/RESULTS-paged.md] [--quick] [--tpw 8,16,32]
       [--shapes 1x131072,32x8192] [--bits 4,3] [--profile] [--no-graph]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from timing import best_sdpa, host_us, timed

import turboquant_codec as tq
from turboquant_codec import paged as public_paged
from turboquant_codec import tuning
from turboquant_codec.backends import availability, cupy_paged, cupy_raw
from turboquant_codec.config import CodecConfig
from turboquant_codec.paged_cache import PagedCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from turboquant_torch.paged import write_beside  # noqa: E402

H_Q, H_KV, D, BS = 32, 8, 128, 16
SCALE = D**-0.5
SHAPES = ((8, 32768), (1, 131072), (32, 8192))
BITS = (3.5, 3.5)  # key, value: the default of --bits K,V
WINDOW, SINKS = 128, 4
LAYERS = 32


def build(b: int, t: int, bits: tuple[float, float], gen, rng):
    """(torch PagedCache, block_table, seq_lens, query_start_loc, slot of each new token, K, V bf16)."""
    import torch

    k_cfg, v_cfg = CodecConfig(D, bits[0], seed=1), CodecConfig(D, bits[1], seed=2)
    rk, rv = k_cfg.record_bytes, v_cfg.record_bytes
    per = -(-(t + 1) // BS)
    nb = b * per + 8
    perm = rng.permutation(nb)
    table = perm[: b * per].reshape(b, per).astype(np.int32)
    packed = torch.empty((nb, H_KV, BS, rk + rv), dtype=torch.uint8, device="cuda")
    # Raw rows: the sink block and the blocks of the last WINDOW tokens (the new token's included).
    raw_blocks = set()
    for r in range(b):
        raw_blocks.update(table[r, : -(-SINKS // BS)].tolist())
        raw_blocks.update(table[r, (t + 1 - WINDOW) // BS: per].tolist())
    rsb = np.full(nb, -1, np.int32)
    rsb[sorted(raw_blocks)] = np.arange(len(raw_blocks))
    # Filled by paged_write below (raw copies of the tokens of blocks with a raw row).
    raw_k = torch.zeros(len(raw_blocks), BS, H_KV, D, device="cuda", dtype=torch.bfloat16)
    raw_v = torch.zeros(len(raw_blocks), BS, H_KV, D, device="cuda", dtype=torch.bfloat16)
    cache = PagedCache(packed[..., :rk].transpose(1, 2), packed[..., rk:].transpose(1, 2), k_cfg, v_cfg,
                       raw_k=raw_k, raw_v=raw_v, raw_slot_of_block=torch.as_tensor(rsb, device="cuda"))
    k = torch.randn(b, H_KV, t, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, H_KV, t, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    chunk = 65536
    for r in range(b):
        for p0 in range(0, t, chunk):
            p = np.arange(p0, min(t, p0 + chunk))
            slots = torch.as_tensor(table[r, p // BS].astype(np.int64) * BS + p % BS, device="cuda")
            kx = k[r, :, p0:p0 + len(p)].transpose(0, 1)
            vx = v[r, :, p0:p0 + len(p)].transpose(0, 1)
            cache = tq.paged_write(cache, kx, vx, slots, backend="cupy_raw")
    bt = torch.as_tensor(table, device="cuda")
    seq = torch.full((b,), t + 1, dtype=torch.int32, device="cuda")
    qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    new_slot = torch.as_tensor(table[:, t // BS].astype(np.int64) * BS + t % BS, device="cuda")
    return cache, bt, seq, qsl, new_slot, k, v


def bench_shape(b: int, t: int, bits: tuple[float, float], rng, log: list[str], extra_tpw: list[int],
                graphs: bool, profile: bool):
    """One shape's rows: (kernel/API row, graph row or None, tiles-per-warp rows)."""
    import cupy as cp
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tpw_rows = []
    graph_row = None
    gen = torch.Generator(device="cuda").manual_seed(b * t)
    cache, bt, seq, qsl, new_slot, k, v = build(b, t, bits, gen, rng)
    q = torch.randn(b, H_Q, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    kn = torch.randn(b, H_KV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    vn = torch.randn(b, H_KV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(q)
    # SDPA baseline: contiguous bf16 K/V of the same length (context + the new token).
    kf = torch.cat([k, kn[:, :, None]], 2)
    vf = torch.cat([v, vn[:, :, None]], 2)
    q4 = q[:, :, None, :]
    best, which = best_sdpa(q4, kf, vf, SCALE, True, log, f" at B={b} T={t}")
    sdpa_kern = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[which]

    native = cache.converted(cupy_raw.asarray)
    nargs = [cupy_raw.asarray(a) for a in (q, kn.reshape(b, H_KV, D), vn.reshape(b, H_KV, D), bt, seq, qsl,
                                            out)]

    def kernel_call(native=native, nargs=nargs, b=b):
        cupy_raw.paged_attention(native, *nargs[:6], SCALE, nargs[6], b)

    def api_call(cache=cache, q=q, kn=kn, vn=vn, bt=bt, seq=seq, qsl=qsl, out=out, b=b):
        tq.paged_attention(cache, q, kn, vn, bt, seq, qsl, scale=SCALE, out=out, num_decodes=b,
                           backend="cupy_raw")

    kernel_call()
    torch.cuda.synchronize()
    # Sanity: relative error against bf16 SDPA on the uncompressed data (the codec's error; the
    # exact check against the reference is tests/test_cupy_paged.py).
    with sdpa_kernel(sdpa_kern):
        ref = F.scaled_dot_product_attention(q4, kf, vf, scale=SCALE, enable_gqa=True)[:, :, 0]
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    mp = cp.get_default_memory_pool()
    used0 = mp.used_bytes()
    ms_k = timed(kernel_call, primed=True)
    ms_api = timed(api_call)
    cached = len(cupy_paged._LAUNCHES)
    us_k = host_us(kernel_call)
    log.append(f"B={b} T={t}: launch cache {cached} -> {len(cupy_paged._LAUNCHES)} entries over the host "
               f"timing; driver launchKernel: {hasattr(cp.cuda.driver, 'launchKernel')}")
    us_api = host_us(api_call)

    def api_checked(api_call=api_call):  # no replay kept: checks, conversions, kept launches
        public_paged._REPLAYS.clear()
        api_call()

    def api_first_sight(api_call=api_call):  # arrays never seen: no replay, launches built anew
        public_paged._REPLAYS.clear()
        cupy_paged._LAUNCHES.clear()
        api_call()

    us_checked, us_first = host_us(api_checked), host_us(api_first_sight)
    log.append(f"B={b} T={t}: public API host us/call: replay {us_api:.1f}, checked (no replay) "
               f"{us_checked:.1f}, first sight (nothing kept) {us_first:.1f}")
    print(log[-1], flush=True)
    scratch = sum(int(buf.nbytes) for (dev, name), buf in cupy_paged._SCRATCH.items() if name == "attention")
    pool_growth = mp.used_bytes() - used0
    # The unpaged kernel (cupy_raw.attention) on the same tokens, contiguous records, no tail.
    ke = tq.encode(k, bits=bits[0], seed=1, backend="cupy_raw")
    ve = tq.encode(v, bits=bits[1], seed=2, backend="cupy_raw")
    enc = [tq.Encoded(cupy_raw.asarray(e.records),
                      None if e.channels is None else cupy_raw.asarray(e.channels), e.config)
           for e in (ke, ve)]
    qn = cupy_raw.asarray(q)
    ms_unpaged = timed(lambda enc=enc: cupy_raw.attention(qn, *enc, SCALE, None, None), primed=True)
    del ke, ve, enc
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                kernel_call()
            torch.cuda.synchronize()
        for evt in prof.key_averages():
            if "tq_" in evt.key:
                total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
                log.append(f"B={b} T={t} {evt.key}: {total / max(evt.count, 1):.1f} us per call")
                print(log[-1], flush=True)
        # One decode layer as the step runs it (paged_write of the new tokens, then attention): every
        # kernel of both, so the write's launches show too.
        slot = new_slot

        def layer_call(cache=cache, kn=kn, vn=vn, slot=slot):
            tq.paged_write(cache, kn, vn, slot, backend="cupy_raw")
            api_call()

        layer_call()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                layer_call()
            torch.cuda.synchronize()
        for evt in prof.key_averages():
            total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
            if total:
                log.append(f"B={b} T={t} layer kernel {evt.key[:60]}: {total / 20:.1f} us per layer "
                           f"({evt.count // 20} launches)")
                if evt.count > 20:  # several launches per layer (e.g. prep rows and raw partials): halves
                    durs = sorted(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
                                  for e in prof.events() if e.name == evt.key)
                    half = len(durs) // 2
                    log[-1] += (f"; shorter half {sum(durs[:half]) / half:.1f} us, longer half "
                                f"{sum(durs[half:]) / (len(durs) - half):.1f} us per launch")
                print(log[-1], flush=True)
    row = (b, t, ms_k, best, which, ms_api, us_k, us_api, scratch, pool_growth, err, ms_unpaged)
    print(row, flush=True)
    for tpw in extra_tpw:  # the kernel call builds and plans for the settings in force
        with tuning.using(cupy_paged=dataclasses.replace(tuning.current().cupy_paged, tiles_per_warp=tpw)):
            ms_v = timed(kernel_call, primed=True)
        tpw_rows.append((b, t, tpw, ms_v, best))

    if graphs:
        qs = torch.randn(LAYERS, b, H_Q, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        kns = torch.randn(LAYERS, b, H_KV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        vns = torch.randn(LAYERS, b, H_KV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        outs = torch.empty_like(qs)

        def tq_step(full=True, beside=False):
            for i in range(LAYERS):
                def write(i=i):
                    tq.paged_write(cache, kns[i], vns[i], new_slot, backend="cupy_raw")

                def attend(i=i):
                    tq.paged_attention(cache, qs[i], kns[i], vns[i], bt, seq, qsl, scale=SCALE, out=outs[i],
                                       num_decodes=b, backend="cupy_raw")
                if not full:
                    attend()
                elif beside:  # as the vLLM plugin runs a layer
                    write_beside(write, attend, qs.device)
                else:
                    write()
                    attend()

        def sdpa_step(full=True):
            with sdpa_kernel(sdpa_kern):
                for i in range(LAYERS):
                    if full:
                        kf[:, :, t] = kns[i]
                        vf[:, :, t] = vns[i]
                    outs[i] = F.scaled_dot_product_attention(qs[i][:, :, None], kf, vf, scale=SCALE,
                                                             enable_gqa=True)[:, :, 0]

        res = []
        for full in (True, False):
            g_tq = graph_of(lambda full=full: tq_step(full))
            g_sd = graph_of(lambda full=full: sdpa_step(full))
            ms_tq = timed(g_tq, reps=15, batch=3)
            ms_sd = timed(g_sd, reps=15, batch=3)
            res.append((ms_tq, ms_sd))
        g_beside = graph_of(lambda: tq_step(True, beside=True))
        graph_row = (b, t, timed(g_beside, reps=15, batch=3), *res[0], *res[1])
        print(graph_row, flush=True)
    return row, graph_row, tpw_rows


def graph_of(fn):
    """fn captured in a torch CUDA graph (warmed up on a side stream first); returns replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main() -> None:
    import cupy as cp
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--tpw", default="", help="extra tiles-per-warp settings timed after the default")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel times (torch.profiler) into the log")
    ap.add_argument("--side-min", type=int, default=None,
                    help="KV streams from which the raw partials run on a side stream "
                         "(CupyPagedTuning.side_min_streams; default: its default)")
    ap.add_argument("--row-threads", type=int, default=None,
                    help="threads of a query-preparation block in side-stream mode "
                         "(CupyPagedTuning.side_row_threads; default: its default)")
    ap.add_argument("--shapes", default="", help="BxT,... instead of the defaults: 1x131072,32x8192")
    ap.add_argument("--bits", default=",".join(f"{x:g}" for x in BITS), help="key,value bits (mse)")
    args = ap.parse_args()
    bits = tuple(float(x) for x in args.bits.split(","))
    if len(bits) != 2:
        raise SystemExit(f"--bits wants 'key,value', got {args.bits!r}")
    status = availability("cupy_raw")
    if not status:
        raise SystemExit(f"cupy_raw unavailable: {status.reason}")
    torch.cuda.init()
    changes = {name: value for name, value in (("side_min_streams", args.side_min),
                                               ("side_row_threads", args.row_threads)) if value is not None}
    paged = dataclasses.replace(tuning.current().cupy_paged, **changes)
    tuning.use(dataclasses.replace(tuning.current(), cupy_paged=paged))  # for the whole run
    card = torch.cuda.get_device_name()
    log = [f"card: {card}", f"torch {torch.__version__}, cupy {cp.__version__}",
           f"split: {paged.split_warps} warps x {paged.tiles_per_warp} tiles per chunk "
           f"(= {16 * paged.split_warps * paged.tiles_per_warp} tokens); raw partials on a "
           f"side stream from {paged.side_min_streams} KV streams (prep rows of {paged.side_row_threads} "
           f"threads there)"]
    extra_tpw = [int(x) for x in args.tpw.split(",") if x]
    rows, graph_rows, tpw_rows = [], [], []
    rng = np.random.default_rng(0)
    shapes = [tuple(int(x) for x in st.split("x")) for st in args.shapes.split(",") if st] or SHAPES
    for b, t in shapes[:1] if args.quick else shapes:
        row, graph_row, more = bench_shape(b, t, bits, rng, log, extra_tpw, not args.no_graph,
                                               args.profile)
        rows.append(row)
        tpw_rows += more
        if graph_row is not None:
            graph_rows.append(graph_row)
        torch.cuda.empty_cache()

    md = [f"# Paged decode benchmark ({card})", "", *[f"- {line}" for line in log], "",
          f"32 query / 8 KV heads, d=128, block size 16, random block table, K mse {bits[0]:g} / "
          f"V mse {bits[1]:g} bits, raw "
          f"pool: {SINKS} sinks' block + last {WINDOW} tokens' blocks per request (bf16); one decode token "
          "per request. SDPA: bf16, contiguous K/V, best of flash and cuDNN, same run.", "",
          "## Decode attention, one layer", "",
          "| B | T | paged kernel ms | bf16 SDPA ms | kernel vs SDPA | public API ms (torch, back-to-back) | "
          "API vs SDPA | host us/call (backend) | host us/call (API) | scratch MiB | rel. err vs SDPA(raw) | "
          "unpaged cupy_raw.attention ms |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b, t, ms_k, best, which, ms_api, us_k, us_api, scratch, _growth, err, ms_unp in rows:
        md.append(f"| {b} | {t} | {ms_k:.4f} | {best:.4f} ({which}) | **{best / ms_k:.2f}x** | "
                  f"{ms_api:.4f} | {best / ms_api:.2f}x | {us_k:.1f} | {us_api:.1f} | "
                  f"{scratch / 2**20:.2f} | "
                  f"{err:.3f} | {ms_unp:.4f} |")
    if graph_rows:
        md += ["", f"## {LAYERS}-layer decode step, torch CUDA graph (ms per step)", "",
               "| B | T | write beside attention (the plugin's) | bf16 copy + SDPA | ratio "
               "| write, then attention | ratio | paged_attention alone | SDPA alone | ratio |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for b, t, w_tq, a_tq, a_sd, o_tq, o_sd in graph_rows:
            md.append(f"| {b} | {t} | {w_tq:.3f} | {a_sd:.3f} | **{a_sd / w_tq:.2f}x** | {a_tq:.3f} | "
                      f"{a_sd / a_tq:.2f}x | {o_tq:.3f} | {o_sd:.3f} | **{o_sd / o_tq:.2f}x** |")
    if tpw_rows:
        md += ["", "## Tiles per warp (chunk = 16 warps x TPW x 16 tokens), kernel ms, same run", "",
               "| B | T | TPW | ms | vs SDPA |", "|---|---|---|---|---|"]
        for b, t, tpw, ms_v, best in tpw_rows:
            md.append(f"| {b} | {t} | {tpw} | {ms_v:.4f} | {best / ms_v:.2f}x |")
    text = "\n".join(md) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
