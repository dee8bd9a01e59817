"""Warp-level decode attention of the numba_cuda backend (its fast path), built per configuration.

Layout owned here
-----------------
One warp per (stream, split), ``warps`` warps per block sharing the rotated queries: lane j scores
key j of a 32-key tile, the online softmax runs per head with warp-shuffle reductions, lane l
accumulates V's extended rotated columns l*CPL.. in registers. Every layout number is a compile-time
constant of ``fast_attention_kernel(k_config, v_config, heads)`` (see ``_build_fast_attention``).
It writes the same split partials as ``numba_kernels.attention_kernel``, which still runs the raw
tail split; ``numba_kernels.combine_rows_kernel`` merges both. It applies whenever V's extended
width is a multiple of 32 (``_fast_attention_spec``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import cuda, float32, int32, int64, uint32, uint64

from .. import tuning as _tuning
from ..config import CodecConfig
from ..transforms import tables as host_tables
from ..tuning import NumbaCudaTuning
from .numba_kernels import NEG_INF, _bf16_value
from .numba_launch import simulated
from .occupancy import STATIC_SMEM_LIMIT

# Lanes per warp and keys per tile.
WARP = 32
TILE = 32
# The kernel's register cap and prefetch are settings: tuning.NumbaCudaTuning, part of its cache key.


# The simulator has no warp intrinsics: there, one warp per block and block barriers stand in.
if simulated():

    @cuda.jit(device=True, inline="always")
    def _syncwarp():  # pragma: no cover
        cuda.syncthreads()

    @cuda.jit(device=True, inline="always")
    def _warp_max(v, red, ro, lane):  # pragma: no cover
        red[ro + lane] = v
        cuda.syncthreads()
        r = red[ro]
        for i in range(1, 32):
            r = max(r, red[ro + i])
        cuda.syncthreads()
        return r

    @cuda.jit(device=True, inline="always")
    def _warp_sum(v, red, ro, lane):  # pragma: no cover
        red[ro + lane] = v
        cuda.syncthreads()
        r = red[ro]
        for i in range(1, 32):
            r += red[ro + i]
        cuda.syncthreads()
        return r

else:

    @cuda.jit(device=True, inline="always")
    def _syncwarp():  # pragma: no cover
        cuda.syncwarp(0xFFFFFFFF)

    @cuda.jit(device=True, inline="always")
    def _warp_max(v, red, ro, lane):  # pragma: no cover
        for s in range(5):
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, 16 >> s))
        return v

    @cuda.jit(device=True, inline="always")
    def _warp_sum(v, red, ro, lane):  # pragma: no cover
        for s in range(5):
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, 16 >> s)
        return v


# Array indices below are wrapped in uint64(): Numba adds a negative-index wraparound test to
# every signed index, and those selects keep LLVM from merging 4 heads' loads into one
# ld.shared.v4 and from folding constant offsets into the load's immediate.
@cuda.jit(device=True, inline="always")
def _window(words, at, shift):  # pragma: no cover
    """32 bits of the LSB-first stream starting ``shift`` (< 32) bits into word ``at``."""
    w = int64(words[uint64(at)]) | (int64(words[uint64(at + 1)]) << 32)
    return w >> shift


@cuda.jit(device=True, inline="always")
def _norm_at(words, base, slot):  # pragma: no cover
    """float32 value of the ``slot``-th bfloat16 norm of a staged record (norms lead the record)."""
    return _bf16_value(int32(words[uint64(base + (slot >> 1))] >> (16 * (slot & 1))) & 0xFFFF)


@cuda.jit(device=True, inline="always")
def _fill_table(tab, off, cent, gi, sign, tid):  # pragma: no cover
    """Value table of one record part at ``tab[off:off+16]``: the 16 centroids of group ``gi``
    or, with ``sign``, the QJL sign values -1, +1 (code 0, 1). 16 entries in 16 consecutive
    banks: lanes looking up different codes never conflict (same code: broadcast)."""
    if tid < 16:
        if sign:
            tab[off + tid] = float32(2 * tid - 1) if tid < 2 else float32(0.0)
        else:
            tab[off + tid] = cent[gi, tid]


# One key code, then explicit doublings up to 32 codes: LLVM will not fully unroll a 32-code
# loop, and only unrolled code turns every word index, shift and query offset into an immediate.
@cuda.jit(device=True, inline="always")
def _code1(ks, wb, qs, qb, tab, part, nheads, bits, o):  # pragma: no cover
    """The code at bit ``o`` from word ``wb``: ``part[h] += qs[qb + h] * tab[code]``."""
    x = tab[uint64(_window(ks, wb + (o >> 5), o & 31) & ((1 << bits) - 1))]
    for h in range(nheads):
        part[h] += qs[uint64(qb + h)] * x


def _doubled(codes: Any, n: int) -> Any:
    """Device function running ``codes`` (``n`` consecutive codes) twice: ``2n`` codes."""

    @cuda.jit(device=True, inline="always")
    def twice(ks, wb, qs, qb, tab, part, nheads, bits, o):  # pragma: no cover
        codes(ks, wb, qs, qb, tab, part, nheads, bits, o)
        codes(ks, wb, qs, qb + n * nheads, tab, part, nheads, bits, o + n * bits)

    return twice

_codes16 = _doubled(_doubled(_doubled(_doubled(_code1, 1), 2), 4), 8)
_codes32 = _doubled(_codes16, 16)


@cuda.jit(device=True, inline="always")
def _key_part(ks, kb, qs, tab, part, nheads, bits, bit0, col0, count, chunk):  # pragma: no cover
    """``part[h] = sum_i q_ext[h, col0 + i] * tab[code_i]`` over ``count`` codes of ``bits`` bits
    starting at bit ``bit0`` of the staged key record at word ``kb``. A chunk of ``chunk`` (32,
    or 16 = all) codes spans whole words, so within it every word index and shift is a
    compile-time constant."""
    for h in range(nheads):
        part[h] = float32(0.0)
    for ci in range(count // chunk):
        wb = kb + (bit0 >> 5) + ci * (chunk * bits // 32)
        qb = (col0 + ci * chunk) * nheads
        if chunk == 32:
            _codes32(ks, wb, qs, qb, tab, part, nheads, bits, bit0 & 31)
        else:
            _codes16(ks, wb, qs, qb, tab, part, nheads, bits, bit0 & 31)


@cuda.jit(device=True, inline="always")
def _value_key(vs, at, vsh, ps, pb, vt, vflag, acc, ph, nheads, cpl, vb,
               vmask):  # pragma: no cover
    """``acc[h*cpl + u] += w_h * vt[vflag | code_u]`` for this lane's ``cpl`` codes of one staged V
    record (``vsh`` bits into word ``at``), weights ``w_h = ps[pb + h]``. ``vflag`` (0, 16, 32)
    selects the part's table; OR instead of add lets shift, mask and table select fold into
    one shift and one 3-input logic op."""
    win = uint32(_window(vs, at, vsh) & 0xFFFFFFFF)  # 32-bit shifts below
    for h in range(nheads):
        ph[h] = ps[uint64(pb + h)]
    for u in range(cpl):
        x = vt[uint64(((win >> (u * vb)) & vmask) | vflag)]
        for h in range(nheads):
            acc[h * cpl + u] += ph[h] * x


@cuda.jit(device=True, inline="always")
def _load_words(dst, src, w0, nwords, valid, lane):  # pragma: no cover
    """Words ``w0 + r*32 + lane`` of a tile's records into registers; 0 past ``valid`` words."""
    for r in range(nwords):
        idx = r * WARP + lane
        dst[r] = src[uint64(w0 + idx)] if uint32(idx) < uint32(valid) else uint32(0)  # 32-bit test


@cuda.jit(device=True, inline="always")
def _store_words(dst, base, pitch, src, nwords, lane):  # pragma: no cover
    """The registers of ``_load_words`` into the warp's staged tile: key ``j`` at ``j*pitch``."""
    for r in range(nwords):
        idx = r * WARP + lane
        if pitch == nwords:  # records back to back (odd word count: still conflict-free)
            dst[uint64(base + idx)] = src[r]
        else:
            j = idx // nwords
            dst[uint64(base + j * pitch + idx - j * nwords)] = src[r]


def _fast_attention_spec(kcfg: CodecConfig, vcfg: CodecConfig, heads: int,
                         tuning: NumbaCudaTuning) -> dict[str, Any] | None:
    """Compile-time constants of the warp attention kernel, or None where it does not apply."""
    d = kcfg.d
    if vcfg.d != d or heads > 8:
        return None
    kqjl, vqjl = kcfg.mode == "prod", vcfg.mode == "prod"
    wk, wv = (2 * d if kqjl else d), (2 * d if vqjl else d)
    if wv % WARP or kcfg.groups[0].dim % 16:  # key chunks of 32 or 16 codes
        return None
    cpl = wv // WARP
    vbits = max(g.code_bits for g in vcfg.groups)
    if cpl * vbits > 32 or heads * cpl > 64:
        return None

    def pad(vals: list[int]) -> tuple[int, int]:
        return (vals[0], vals[-1])

    def record(cfg: CodecConfig, qjl: bool) -> dict[str, Any]:
        gs = cfg.groups
        words = cfg.record_bytes // 4
        pitch = words if words % 2 else words + 1  # odd: lane j reading key j hits 32 banks
        return dict(ng=len(gs), g=gs[0].dim, bits=pad([g.code_bits for g in gs]),
                    co=pad([g.code_offset for g in gs]), so=pad([max(g.sign_offset, 0) for g in gs]),
                    npg=2 if qjl else 1, words=words, pitch=pitch, qjl=qjl,
                    qs=np.float32(host_tables(cfg)[0].qjl_scale),
                    chunk=32 if gs[0].dim % 32 == 0 else 16)

    k, v = record(kcfg, kqjl), record(vcfg, vqjl)
    slots = len(vcfg.groups) * v["npg"]
    per_warp = 4 * (TILE * (k["pitch"] + v["pitch"] + slots * heads) + WARP)
    fixed = 4 * (wk * heads + 3 * 16 + 48 + 2)  # queries, K's and V's value tables, window slack
    choices = (1,) if simulated() else (4, 2, 1)  # the simulator's warp stand-ins need 1 warp
    warps = next((w for w in choices if fixed + w * per_warp <= STATIC_SMEM_LIMIT), 0)
    if not warps:
        return None
    return dict(d=d, heads=heads, wk=wk, wv=wv, cpl=cpl, k=k, v=v, warps=warps,
                prefetch=tuning.attn_prefetch, max_registers=tuning.attn_max_registers)


def fast_attention_kernel(kcfg: CodecConfig, vcfg: CodecConfig, heads: int,
                          tuning: NumbaCudaTuning | None = None) -> tuple[Any, int] | None:
    """(kernel, warps per block) of the warp attention for one (K config, V config, GQA group),
    compiled for ``tuning`` (default: the settings in force); None where it does not apply."""
    return _fast_attention_kernel(kcfg, vcfg, heads, tuning or _tuning.current().numba_cuda)


@functools.lru_cache(maxsize=64)
def _fast_attention_kernel(kcfg: CodecConfig, vcfg: CodecConfig, heads: int,
                           tuning: NumbaCudaTuning) -> tuple[Any, int] | None:
    spec = _fast_attention_spec(kcfg, vcfg, heads, tuning)
    if spec is None:
        return None
    return _build_fast_attention(spec), spec["warps"]


def _build_fast_attention(spec: dict[str, Any]) -> Any:
    """The warp-per-(stream, split) attention kernel, specialised to ``spec`` (all constants).

    Block (split block, stream) of ``WARPS`` warps; warp ``w`` owns split ``blockIdx.x*WARPS + w``.
    Shared by the block: the rotated queries ``qs[c*G + h]`` (column-major over the GQA group, so
    one ``ld.shared.v4`` reads 4 heads) and the 16-entry value tables (``_fill_table``). Per warp:
    the staged tile of 32 K records and 32 V records (key ``j`` at word ``j*pitch``, odd pitch so
    lane ``j`` reading key ``j`` hits 32 banks), and the V weights ``ps[(j*NSL + s)*G + h]``.

    Per 32-key tile: the warp stages the K and V words (loaded at the tile's start, or with
    ``prefetch`` one tile ahead into registers; keys past the split end are zero words, so every
    loop runs a constant 32 keys), lane ``j`` scores key ``j`` for every head (``_key_part``: code
    shifts and query offsets are immediates), the online softmax runs per head with warp-shuffle
    reductions and leaves ``p * norm`` per key and V scale slot in ``ps``, then lane ``l``
    accumulates V's extended rotated coordinates ``l*CPL .. l*CPL+CPL-1`` for every head in
    registers (``_value_key``, 4 keys per loop step). Writes the same partials as
    ``attention_kernel`` (running max, sum, accumulator), merged by ``combine_rows_kernel``.

    Why single-code tables (one 4-byte load per code) and not pair tables (one 8-byte load per two
    codes, ~10% fewer instructions, tried): a 16-entry table sits in 16 banks, so a warp's lookups
    are one shared-memory wavefront; a 256-entry pair table puts lanes with different codes in
    the same bank (~3-way per half warp, ~6 wavefronts per load), and shared-memory wavefronts,
    not issue slots, would then bound the kernel.
    """
    D, G, WK, WV, CPL, WARPS = (spec[s] for s in ("d", "heads", "wk", "wv", "cpl", "warps"))
    PREFETCH = spec["prefetch"]
    K, V = spec["k"], spec["v"]
    KNG, KG, KCH = K["ng"], K["g"], K["chunk"]
    KB0, KB1, KCO0, KCO1, KSO0, KSO1 = (K["bits"][0], K["bits"][1], K["co"][0], K["co"][1],
                                        K["so"][0], K["so"][1])
    KNPG, KWORDS, KP, KQJL, KQS = K["npg"], K["words"], K["pitch"], K["qjl"], K["qs"]
    VNG, VG, VBITS, VCO, VSO = V["ng"], V["g"], V["bits"], V["co"], V["so"]
    VNPG, VWORDS, VP, VQJL, VQS = V["npg"], V["words"], V["pitch"], V["qjl"], V["qs"]
    QS = WK * G
    NACC = G * CPL
    NSL = VNG * VNPG  # V scale slots per key: per group |x_g| (and gamma_g * qjl_scale)
    # Shared array sizes must be plain constants; +1 word: the last key's two-word window.
    KS_N, VS_N = WARPS * TILE * KP + 1, WARPS * TILE * VP + 1
    PS_N, RED_N = WARPS * TILE * NSL * G, WARPS * WARP
    NT = WARPS * WARP
    # 16-byte aligned query and weight rows let LLVM load 4 heads with one ld.shared.v4.
    ALIGN = None if simulated() else 16
    NEG = np.float32(NEG_INF)

    options: dict[str, Any] = {}
    if spec["max_registers"] is not None:
        options["max_registers"] = spec["max_registers"]

    @cuda.jit(**options)
    def kernel(qext, krec, vrec, n, chunk, nsplit, scale, kcent, vcent,
               m_part, l_part, acc_part):  # pragma: no cover
        qs = cuda.shared.array(QS, float32, alignment=ALIGN)
        # Value tables: K's per record part (so each part's lookups address from offset 0), V's
        # in one array (group 0 at 0, group 1 at 16, QJL signs at 32: a lane's part by OR).
        kt0 = cuda.shared.array(16, float32)
        kt1 = cuda.shared.array(16, float32)
        kts = cuda.shared.array(16, float32)
        vt = cuda.shared.array(48, float32)
        ks = cuda.shared.array(KS_N, uint32)
        vs = cuda.shared.array(VS_N, uint32)
        ps = cuda.shared.array(PS_N, float32, alignment=ALIGN)
        red = cuda.shared.array(RED_N, float32)
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        stream = cuda.blockIdx.y
        qrow0 = stream * G
        for idx in range(tid, QS, NT):
            c = idx // G
            qs[idx] = qext[qrow0 + idx - c * G, c]
        _fill_table(kt0, 0, kcent, 0, False, tid)
        _fill_table(vt, 0, vcent, 0, False, tid)
        if KNG == 2:
            _fill_table(kt1, 0, kcent, 1, False, tid)
        if VNG == 2:
            _fill_table(vt, 16, vcent, 1, False, tid)
        if KQJL:
            _fill_table(kts, 0, kcent, 0, True, tid)
        if VQJL:
            _fill_table(vt, 32, vcent, 0, True, tid)
        cuda.syncthreads()
        split = cuda.blockIdx.x * WARPS + warp
        if split >= nsplit:
            return
        start = split * chunk
        stop = min(n, start + chunk)
        kso = warp * TILE * KP
        vso = warp * TILE * VP
        pso = warp * TILE * NSL * G
        ro = warp * WARP

        # This lane's V coordinates: CPL consecutive extended columns, all in one record part.
        c0 = lane * CPL
        if c0 < D:
            vgi = c0 // VG
            vb = VBITS[vgi]
            vbit = VCO[vgi] * 8 + (c0 - vgi * VG) * vb
            vflag = 16 * vgi
            vslot = vgi * VNPG
        else:
            vgi = (c0 - D) // VG
            vb = 1
            vbit = VSO[vgi] * 8 + (c0 - D - vgi * VG)
            vflag = 32
            vslot = vgi * VNPG + 1
        vwi = vbit >> 5
        vsh = vbit & 31
        vmask = (1 << vb) - 1

        m = cuda.local.array(G, float32)
        lsum = cuda.local.array(G, float32)
        corr = cuda.local.array(G, float32)
        prob = cuda.local.array(G, float32)
        vsc = cuda.local.array(4, float32)
        sc = cuda.local.array(G, float32)
        part = cuda.local.array(G, float32)
        ph = cuda.local.array(G, float32)
        acc = cuda.local.array(NACC, float32)
        kw = cuda.local.array(KWORDS, uint32)
        vw = cuda.local.array(VWORDS, uint32)
        for h in range(G):
            m[h] = NEG
            lsum[h] = float32(0.0)
        for i in range(NACC):
            acc[i] = float32(0.0)

        kw0 = (stream * n + start) * KWORDS
        vw0 = (stream * n + start) * VWORDS
        if PREFETCH:
            nk = min(TILE, stop - start)
            _load_words(kw, krec, kw0, KWORDS, nk * KWORDS, lane)
            _load_words(vw, vrec, vw0, VWORDS, nk * VWORDS, lane)
        for j0 in range(start, stop, TILE):
            nk = min(TILE, stop - j0)
            if not PREFETCH:
                _load_words(kw, krec, kw0, KWORDS, nk * KWORDS, lane)
                _load_words(vw, vrec, vw0, VWORDS, nk * VWORDS, lane)
            _store_words(ks, kso, KP, kw, KWORDS, lane)
            _store_words(vs, vso, VP, vw, VWORDS, lane)
            kw0 += TILE * KWORDS
            vw0 += TILE * VWORDS
            if PREFETCH:  # the next tile's words travel while this tile is worked on
                nxt = max(0, min(TILE, stop - j0 - TILE))
                _load_words(kw, krec, kw0, KWORDS, nxt * KWORDS, lane)
                _load_words(vw, vrec, vw0, VWORDS, nxt * VWORDS, lane)
            _syncwarp()

            # Scores: lane j <-> key j of the tile.
            kb = kso + lane * KP
            for s in range(NSL):  # V scales of this key: p * scale is what the V lanes need
                val = _norm_at(vs, vso + lane * VP, s)
                vsc[s] = val * VQS if (VQJL and (s & 1)) else val
            _key_part(ks, kb, qs, kt0, part, G, KB0, KCO0 * 8, 0, KG, KCH)
            nrm = _norm_at(ks, kb, 0)
            for h in range(G):
                sc[h] = part[h] * nrm
            if KNG == 2:
                _key_part(ks, kb, qs, kt1, part, G, KB1, KCO1 * 8, KG, KG, KCH)
                nrm = _norm_at(ks, kb, KNPG)
                for h in range(G):
                    sc[h] += part[h] * nrm
            if KQJL:
                _key_part(ks, kb, qs, kts, part, G, 1, KSO0 * 8, D, KG, KCH)
                nrm = _norm_at(ks, kb, 1) * KQS
                for h in range(G):
                    sc[h] += part[h] * nrm
                if KNG == 2:
                    _key_part(ks, kb, qs, kts, part, G, 1, KSO1 * 8, D + KG, KG, KCH)
                    nrm = _norm_at(ks, kb, 3) * KQS
                    for h in range(G):
                        sc[h] += part[h] * nrm

            # Online softmax per head; the running max is warp-uniform. Keys past the split end
            # (zero words) get weight 0.
            for h in range(G):
                logit = sc[h] * scale if lane < nk else NEG
                mnew = max(m[h], _warp_max(logit, red, ro, lane))
                cr = math.exp(m[h] - mnew)
                p = math.exp(logit - mnew)
                lsum[h] = lsum[h] * cr + p
                m[h] = mnew
                corr[h] = cr
                prob[h] = p
            for s in range(NSL):  # heads innermost: one 16-byte store per 4 heads
                for h in range(G):
                    ps[uint64(pso + (lane * NSL + s) * G + h)] = prob[h] * vsc[s]
            for h in range(G):
                for u in range(CPL):
                    acc[h * CPL + u] *= corr[h]
            _syncwarp()

            # Values: lane l <-> extended columns l*CPL .. l*CPL+CPL-1, two codes per table load.
            for j in range(0, TILE, 4):  # 4 keys per step: their offsets become immediates
                vb0 = vso + j * VP + vwi
                pb0 = pso + (j * NSL + vslot) * G
                for jj in range(4):
                    _value_key(vs, vb0 + jj * VP, vsh, ps, pb0 + jj * NSL * G, vt, vflag, acc, ph, G,
                               CPL, vb, vmask)
            _syncwarp()

        for h in range(G):
            total = _warp_sum(lsum[h], red, ro, lane)
            row = qrow0 + h
            if lane == 0:
                m_part[row, split] = m[h]
                l_part[row, split] = total
            for u in range(CPL):
                acc_part[row, split, c0 + u] = acc[h * CPL + u]

    return kernel
