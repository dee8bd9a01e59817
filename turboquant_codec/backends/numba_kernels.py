"""Block kernels of the numba_cuda backend: encode, decode, query rotation, scores, block
attention (the raw tail split, and configurations the warp kernel does not cover), the split
combine, and the channel-energy sums for outlier selection.

Layout owned here
-----------------
One block of ``THREADS`` threads per tile of rows (encode, decode, query rotation) or per (split, KV
head, stream) (attention, flash-decoding style) or per query row (combine); all intermediates live
in one dynamic float32 shared-memory buffer whose regions each kernel carves out by offset. Small
dense products (``_rowmat``) give every thread ``VPT`` rows of one output column so each matrix load
feeds ``VPT`` multiply-adds. Attention splits the sequence into chunks and keeps an online softmax
per query head of the GQA group; ``combine_rows_kernel`` merges the splits (and the raw tail split),
then undoes S and R once per output row. Tables and the extended rotated row are described in
``numba_cuda``.
"""

from __future__ import annotations

import math

from numba import cuda, float32, float64, int32, uint64

from ..config import NORM_LIMIT

# Threads per block: 4 warps keep several blocks resident per SM and simulator grids cheap.
THREADS = 128
# Rows per thread in rowmat: each loaded matrix element feeds this many multiply-adds.
VPT = 4
# Initial running max of the online softmax.
NEG_INF = -math.inf


@cuda.jit(device=True, inline="always")
def _to_f32(v, bf16):  # pragma: no cover - runs on the device
    """A loaded element as float32; ``bf16``: ``v`` holds bfloat16 bits (uint16)."""
    if bf16:
        u = int32(v)
        e = (u >> 7) & 0xFF
        m = u & 0x7F
        mag = float32(math.ldexp(float32(m + 128 if e else m), int((e if e else 1) - 134)))
        return -mag if u & 0x8000 else mag
    return float32(v)


@cuda.jit(device=True, inline="always")
def _round_even(v):  # pragma: no cover
    """Round a non-negative float32 to the nearest integer, ties to even (exact for |v| < 2**23)."""
    f = math.floor(v)
    diff = v - f
    i = int32(f)
    if diff > 0.5 or (diff == 0.5 and (i & 1)):
        i += 1
    return i


@cuda.jit(device=True, inline="always")
def _bf16_bits(v):  # pragma: no cover
    """bfloat16 bits of a float32, rounded to nearest even (as ml_dtypes and torch)."""
    if v != v:
        return int32(0x7FC0)
    sign = int32(0x8000) if v < 0.0 or (v == 0.0 and math.copysign(1.0, v) < 0.0) else int32(0)
    a = abs(v)
    if a == 0.0:
        return sign
    if math.isinf(a):
        return sign | int32(0x7F80)
    m, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1
    if e < -125:  # below the smallest normal 2**-126: subnormal steps of 2**-133
        return sign | _round_even(float32(math.ldexp(a, 133)))
    # 8 significant bits; a carry into the exponent (or to inf) falls out of the addition.
    mant = _round_even(float32(math.ldexp(m, 8)))
    return sign | (((e + 126) << 7) + mant - 128)


@cuda.jit(device=True, inline="always")
def _bf16_value(h):  # pragma: no cover
    """float32 value of the finite non-negative bfloat16 with bits ``h``: its 8-bit significand
    times 2**(max(e, 1) - 134), as exact float products (no ldexp: ``2**(e & 63)`` is a uint64 shift)."""
    e = (h >> 7) & 0xFF
    mant = float32((h & 0x7F) | (0x80 if e else 0))
    e = max(e, 1)
    hi = e >> 6  # 2**(e - 134) = 2**(e & 63) * 2**(64 hi - 134)
    base = float32(2.0**-134) if hi == 0 else (float32(2.0**-70) if hi == 1 else (
        float32(2.0**-6) if hi == 2 else float32(2.0**58)))
    return mant * float32(uint64(1) << uint64(e & 63)) * base


@cuda.jit(device=True, inline="always")
def _count_below(bnd, gi, y, nb):  # pragma: no cover
    """Number of boundaries strictly below ``y``: NumPy's ``searchsorted(boundaries, y)``."""
    code = 0
    for k in range(nb):
        if bnd[gi, k] < y:
            code += 1
    return code


@cuda.jit(device=True, inline="always")
def _bits_at(rec, row, pos, width):  # pragma: no cover
    """``width`` (<= 8) bits of record ``row`` starting at bit ``pos`` of the LSB-first stream."""
    byte = pos >> 3
    shift = pos & 7
    word = int32(rec[row, byte])
    if shift + width > 8:
        word |= int32(rec[row, byte + 1]) << 8
    return (word >> shift) & ((1 << width) - 1)


@cuda.jit(device=True, inline="always")
def _ext_value(rec, row, c, d, g, cent, meta, qjl_scale):  # pragma: no cover
    """Column ``c`` of the extended rotated row of record ``row`` (see ``numba_cuda``'s docstring)."""
    if c < d:
        gi = c // g
        i = c - gi * g
        bits = meta[gi, 1]
        code = _bits_at(rec, row, meta[gi, 0] * 8 + i * bits, bits)
        at = meta[gi, 3]
        return _bf16_value(int32(rec[row, at]) | (int32(rec[row, at + 1]) << 8)) * cent[gi, code]
    c -= d
    gi = c // g
    i = c - gi * g
    at = meta[gi, 3] + 2
    gamma = _bf16_value(int32(rec[row, at]) | (int32(rec[row, at + 1]) << 8)) * qjl_scale
    bit = _bits_at(rec, row, meta[gi, 2] * 8 + i, 1)
    return gamma if bit else -gamma


@cuda.jit(device=True, inline="always")
def _rowmat(sm, src, src_pitch, dst, dst_pitch, nv, d, g, mat, accumulate, tid):  # pragma: no cover
    """Per group: ``dst[v, gi*g + i] (+)= sum_k src[v, gi*g + k] * mat[gi, k, i]`` for v < nv.

    ``src``/``dst`` are offsets into the shared buffer ``sm``; rows beyond ``nv`` (up to the next
    multiple of VPT) are read but never written, so the tile must be padded to VPT rows.
    """
    blocks = (nv + VPT - 1) // VPT
    acc = cuda.local.array(VPT, float32)
    for idx in range(tid, blocks * d, THREADS):
        vb = idx // d
        c = idx - vb * d
        gi = c // g
        i = c - gi * g
        v0 = vb * VPT
        base = src + v0 * src_pitch + gi * g
        for u in range(VPT):
            acc[u] = 0.0
        for k in range(g):
            m = mat[gi, k, i]
            for u in range(VPT):
                acc[u] += sm[base + u * src_pitch + k] * m
        for u in range(VPT):
            if v0 + u < nv:
                at = dst + (v0 + u) * dst_pitch + c
                sm[at] = sm[at] + acc[u] if accumulate else acc[u]


@cuda.jit(device=True, inline="always")
def _load_rows(sm, dst, x, bf16, chans, has_ch, per_stream, row0, nv, d, tid):  # pragma: no cover
    """Rows ``row0 .. row0+nv`` of ``x`` into ``sm[dst]`` (pitch d) in record channel order."""
    for idx in range(tid, nv * d, THREADS):
        v = idx // d
        c = idx - v * d
        row = row0 + v
        src = min(int32(chans[row // per_stream, c]), d - 1) if has_ch else c
        sm[dst + idx] = _to_f32(x[row, src], bf16)


@cuda.jit(device=True, inline="always")
def _stage_tokens(sm, dst, pitch, width, nk, tail, raw, raw_row, bf16, rec, rec_row, d, g, cent,
                  meta, qjl_scale, tid):  # pragma: no cover
    """Stage ``nk`` token rows (raw tail rows or extended rows of records) at ``sm[dst]``."""
    for idx in range(tid, nk * width, THREADS):
        j = idx // width
        c = idx - j * width
        if tail:
            val = _to_f32(raw[raw_row + j, c], bf16)
        else:
            val = _ext_value(rec, rec_row + j, c, d, g, cent, meta, qjl_scale)
        sm[dst + j * pitch + c] = val


@cuda.jit(device=True, inline="always")
def _group_norms(sm, src, dst, nv, d, g, ngroups, slot, tid):  # pragma: no cover
    """Euclidean norm of each (row, group) of ``sm[src]`` into ``sm[dst + v*2*ngroups + 2*gi + slot]``.

    The squares are summed of the entries times 2**-e, 2**e the power of two at the largest entry
    (exact products): float32 squares of entries past ~1e19 would overflow and below ~1e-19 lose
    their bits, while norms stored as bfloat16 span float32's range.
    """
    for idx in range(tid, nv * ngroups, THREADS):
        v = idx // ngroups
        gi = idx - v * ngroups
        base = src + v * d + gi * g
        top = float32(0.0)
        for k in range(g):
            top = max(top, abs(sm[base + k]))
        _, e = math.frexp(top)
        e = min(max(e, -100), 126)  # 2**-e stays a normal float32
        down = float32(math.ldexp(float32(1.0), -e))
        s = float32(0.0)
        for k in range(g):
            u = sm[base + k] * down
            s += u * u
        sm[dst + v * 2 * ngroups + 2 * gi + slot] = math.sqrt(s) * float32(math.ldexp(float32(1.0), e))


@cuda.jit(device=True, inline="always")
def _unrotate(sm, ys, xs, nv, d, g, rot, proj, qjl, tid):  # pragma: no cover
    """Extended rotated rows ``sm[ys]`` (pitch W) -> vectors in record order ``sm[xs]`` (pitch d)."""
    width = 2 * d if qjl else d
    if qjl:  # fold the QJL part into the centroid part: ext[:d] += ext[d:] @ S
        _rowmat(sm, ys + d, width, ys, width, nv, d, g, proj, True, tid)
        cuda.syncthreads()
    _rowmat(sm, ys, width, xs, d, nv, d, g, rot, False, tid)
    cuda.syncthreads()


@cuda.jit(device=True, inline="always")
def _record_byte(sm, xs, cs, ns, v, o, d, g, ngroups, qjl, meta):  # pragma: no cover
    """Byte ``o`` of the record of tile row ``v``: norms, packed codes, packed signs or padding."""
    npg = 2 if qjl else 1
    if o < 2 * ngroups * npg:
        k = o >> 1
        gi = k // npg
        h = _bf16_bits(sm[ns + v * 2 * ngroups + 2 * gi + (k - gi * npg)])
        return (h >> (8 * (o & 1))) & 0xFF
    out = 0
    for gi in range(ngroups):
        bits = meta[gi, 1]
        first = meta[gi, 0]
        if first <= o < first + g * bits // 8:
            for b in range(8):
                p = (o - first) * 8 + b
                i = p // bits
                code = int32(sm[cs + v * d + gi * g + i])
                out |= ((code >> (p - i * bits)) & 1) << b
        first = meta[gi, 2]
        if qjl and first <= o < first + g // 8:
            for b in range(8):
                if sm[xs + v * d + gi * g + (o - first) * 8 + b] >= 0.0:
                    out |= 1 << b
    return out


# ------------------------------------------------------------------------------------------ kernels
@cuda.jit
def encode_kernel(x, bf16, chans, has_ch, per_stream, rec, overflow, tile,
                  rot_t, proj_t, cent, bnd, meta, g, ngroups, qjl):  # pragma: no cover
    """One block per ``tile`` rows: gather, norms, rotate, quantise, QJL-sketch, pack bytes."""
    sm = cuda.shared.array(0, float32)
    tid = cuda.threadIdx.x
    rows, d = x.shape
    rb = rec.shape[1]
    row0 = cuda.blockIdx.x * tile
    nv = min(tile, rows - row0)
    xs, ys, cs, ns = 0, tile * d, 2 * tile * d, 3 * tile * d
    _load_rows(sm, xs, x, bf16, chans, has_ch, per_stream, row0, nv, d, tid)
    cuda.syncthreads()
    _group_norms(sm, xs, ns, nv, d, g, ngroups, 0, tid)
    _rowmat(sm, xs, d, ys, d, nv, d, g, rot_t, False, tid)  # y = x_g @ R^T (norm applied below)
    cuda.syncthreads()
    for idx in range(tid, nv * d, THREADS):
        v = idx // d
        gi = (idx - v * d) // g
        norm = sm[ns + v * 2 * ngroups + 2 * gi]
        y = sm[ys + idx] / norm if norm > 0.0 else sm[ys + idx]
        code = _count_below(bnd, gi, y, meta[gi, 4])
        sm[cs + idx] = code
        sm[ys + idx] = y - cent[gi, code]  # the residual (used by prod mode only)
    for idx in range(tid, nv * ngroups, THREADS):
        if sm[ns + (idx // ngroups) * 2 * ngroups + 2 * (idx % ngroups)] >= NORM_LIMIT:
            cuda.atomic.add(overflow, 0, 1)
    cuda.syncthreads()
    if qjl:
        _group_norms(sm, ys, ns, nv, d, g, ngroups, 1, tid)
        _rowmat(sm, ys, d, xs, d, nv, d, g, proj_t, False, tid)  # S @ residual, into xs
        cuda.syncthreads()
        for idx in range(tid, nv * ngroups, THREADS):  # residual norm in x units
            at = ns + (idx // ngroups) * 2 * ngroups + 2 * (idx % ngroups)
            sm[at + 1] *= sm[at]
        cuda.syncthreads()
    for idx in range(tid, nv * rb, THREADS):
        v = idx // rb
        rec[row0 + v, idx - v * rb] = _record_byte(sm, xs, cs, ns, v, idx - v * rb, d, g, ngroups,
                                                   qjl, meta)


@cuda.jit
def decode_kernel(rec, chans, has_ch, per_stream, out, tile, rot, proj, cent, meta,
                  g, qjl, qjl_scale):  # pragma: no cover
    """One block per ``tile`` rows: extended rows from the bytes, undo S and R, scatter channels."""
    sm = cuda.shared.array(0, float32)
    tid = cuda.threadIdx.x
    rows, d = out.shape
    width = 2 * d if qjl else d
    row0 = cuda.blockIdx.x * tile
    nv = min(tile, rows - row0)
    ys, xs = 0, tile * width
    for idx in range(tid, nv * width, THREADS):
        v = idx // width
        sm[ys + idx] = _ext_value(rec, row0 + v, idx - v * width, d, g, cent, meta, qjl_scale)
    cuda.syncthreads()
    _unrotate(sm, ys, xs, nv, d, g, rot, proj, qjl, tid)
    for idx in range(tid, nv * d, THREADS):
        v = idx // d
        c = idx - v * d
        row = row0 + v
        dst = min(int32(chans[row // per_stream, c]), d - 1) if has_ch else c
        out[row, dst] = sm[xs + idx]


@cuda.jit
def query_kernel(q, bf16, chans, has_ch, per_stream, out, tile, rot_t, proj_t, g,
                 qjl):  # pragma: no cover
    """Queries in the keys' extended rotated domain: ``[q_g @ R^T, (q_g @ R^T) @ S^T]``."""
    sm = cuda.shared.array(0, float32)
    tid = cuda.threadIdx.x
    rows, d = q.shape
    width = out.shape[1]
    row0 = cuda.blockIdx.x * tile
    nv = min(tile, rows - row0)
    xs, ys = 0, tile * d
    _load_rows(sm, xs, q, bf16, chans, has_ch, per_stream, row0, nv, d, tid)
    cuda.syncthreads()
    _rowmat(sm, xs, d, ys, width, nv, d, g, rot_t, False, tid)
    cuda.syncthreads()
    if qjl:
        _rowmat(sm, ys, width, ys + d, width, nv, d, g, proj_t, False, tid)
        cuda.syncthreads()
    for idx in range(tid, nv * width, THREADS):
        v = idx // width
        out[row0 + v, idx - v * width] = sm[ys + idx]


@cuda.jit
def scores_kernel(qext, rec, out, tile, d, cent, meta, g, qjl_scale):  # pragma: no cover
    """Block (key tile, stream): dequantise ``tile`` keys to extended rows, dot with each query."""
    sm = cuda.shared.array(0, float32)
    tid = cuda.threadIdx.x
    s = cuda.blockIdx.y
    _, m, n = out.shape
    width = qext.shape[1]
    pitch = width + 1  # odd pitch: lanes reading one column of different keys hit different banks
    j0 = cuda.blockIdx.x * tile
    nk = min(tile, n - j0)
    for idx in range(tid, nk * width, THREADS):
        j = idx // width
        sm[j * pitch + idx - j * width] = _ext_value(rec, s * n + j0 + j, idx - j * width,
                                                     d, g, cent, meta, qjl_scale)
    cuda.syncthreads()
    for idx in range(tid, m * nk, THREADS):
        a = idx // nk
        j = idx - a * nk
        acc = float32(0.0)
        for c in range(width):
            acc += qext[s * m + a, c] * sm[j * pitch + c]
        out[s, a, j0 + j] = acc


@cuda.jit
def attention_kernel(qext, qraw, bf16q, krec, vrec, ktail, vtail, bf16t, n, t, chunk, nsplit,
                     first, groups, scale, tk, d, wk, wv, kcent, kmeta, kg, kqs, vcent, vmeta, vg,
                     vqs, m_part, l_part, acc_part):  # pragma: no cover
    """Block (split, KV head, stream): online softmax over one chunk of tokens for a GQA group.

    Splits ``0 .. nsplit-1`` read compressed tokens (scores against the rotated queries, values
    accumulated in V's extended rotated domain); split ``nsplit`` reads the raw tail (plain
    queries, values in channel order). Each writes its running max, sum and accumulator.
    Block ``x`` runs split ``first + x`` (the warp kernel's callers launch the tail split only).
    """
    sm = cuda.shared.array(0, float32)
    tid = cuda.threadIdx.x
    split = first + cuda.blockIdx.x
    stream = cuda.blockIdx.z * cuda.gridDim.y + cuda.blockIdx.y
    qrow0 = stream * groups  # = l * h_q + h_kv_index * groups
    kp, vp = wk + 1, wv + 1  # odd pitches: lanes reading one column of different keys spread banks
    qs = 0
    ks = qs + groups * wk
    vs = ks + tk * kp
    ps = vs + tk * vp
    acc = ps + groups * tk
    ms = acc + groups * wv
    ls = ms + groups
    cs = ls + groups
    tail = split == nsplit
    start = 0 if tail else split * chunk
    stop = t if tail else min(n, start + chunk)
    wkk = d if tail else wk
    wvv = d if tail else wv
    for idx in range(tid, groups * wkk, THREADS):
        h = idx // wkk
        c = idx - h * wkk
        sm[qs + h * wk + c] = _to_f32(qraw[qrow0 + h, c], bf16q) if tail else qext[qrow0 + h, c]
    for idx in range(tid, groups * wv, THREADS):
        sm[acc + idx] = 0.0
    for h in range(tid, groups, THREADS):
        sm[ms + h] = NEG_INF
        sm[ls + h] = 0.0
    cuda.syncthreads()
    for j0 in range(start, stop, tk):
        nk = min(tk, stop - j0)
        _stage_tokens(sm, ks, kp, wkk, nk, tail, ktail, stream * t + j0, bf16t, krec,
                      stream * n + j0, d, kg, kcent, kmeta, kqs, tid)
        _stage_tokens(sm, vs, vp, wvv, nk, tail, vtail, stream * t + j0, bf16t, vrec,
                      stream * n + j0, d, vg, vcent, vmeta, vqs, tid)
        cuda.syncthreads()
        for idx in range(tid, groups * tk, THREADS):
            h = idx // tk
            j = idx - h * tk
            logit = NEG_INF
            if j < nk:
                dot = float32(0.0)
                for c in range(wkk):
                    dot += sm[qs + h * wk + c] * sm[ks + j * kp + c]
                logit = dot * scale
            sm[ps + idx] = logit
        cuda.syncthreads()
        for h in range(tid, groups, THREADS):  # online softmax update, one thread per head
            m_old = sm[ms + h]
            m_new = m_old
            for j in range(nk):
                m_new = max(m_new, sm[ps + h * tk + j])
            total = float32(0.0)
            for j in range(nk):
                p = math.exp(sm[ps + h * tk + j] - m_new)
                sm[ps + h * tk + j] = p
                total += p
            corr = math.exp(m_old - m_new)  # 0 on the first tile (m_old = -inf)
            sm[ls + h] = sm[ls + h] * corr + total
            sm[ms + h] = m_new
            sm[cs + h] = corr
        cuda.syncthreads()
        for idx in range(tid, groups * wvv, THREADS):
            h = idx // wvv
            c = idx - h * wvv
            a = sm[acc + h * wv + c] * sm[cs + h]
            for j in range(nk):
                a += sm[ps + h * tk + j] * sm[vs + j * vp + c]
            sm[acc + h * wv + c] = a
        cuda.syncthreads()
    for h in range(tid, groups, THREADS):
        m_part[qrow0 + h, split] = sm[ms + h]
        l_part[qrow0 + h, split] = sm[ls + h]
    for idx in range(tid, groups * wvv, THREADS):
        h = idx // wvv
        c = idx - h * wvv
        acc_part[qrow0 + h, split, c] = sm[acc + h * wv + c]


@cuda.jit
def energy_kernel(x, bf16, n, chunk, partial):  # pragma: no cover
    """partial[s, k, c] = sum of x[s*n + j, c]**2 over j in chunk k, in float64, in a fixed order."""
    s = cuda.blockIdx.z
    k = cuda.blockIdx.y
    c = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
    d = x.shape[1]
    if c >= d:
        return
    acc = float64(0.0)
    for j in range(k * chunk, min(n, (k + 1) * chunk)):
        # float64 before squaring: numba's float() of a float32 kept the product in float32, whose
        # squares overflow past ~1.8e19 (every energy inf at 1e30: the ranking fell to index order).
        v = float64(_to_f32(x[s * n + j, c], bf16))
        acc += v * v
    partial[s, k, c] = acc


@cuda.jit
def combine_rows_kernel(m_part, l_part, acc_part, nsplit, chans, has_ch, per_stream, out,
                        rot, proj, g, qjl):  # pragma: no cover
    """One block per query row: merge the splits, undo V's S and R, add the raw tail split."""
    sm = cuda.shared.array(0, float32)
    tid = cuda.threadIdx.x
    row = cuda.blockIdx.x
    d = out.shape[1]
    nsp = m_part.shape[1]
    width = 2 * d if qjl else d
    ws = 0
    inv = nsp
    ys = nsp + 1
    zs = ys + width
    mx = float32(NEG_INF)
    for s in range(nsp):
        mx = max(mx, m_part[row, s])
    for s in range(tid, nsp, THREADS):
        mv = m_part[row, s]
        sm[ws + s] = math.exp(mv - mx) if mv > NEG_INF else float32(0.0)
    cuda.syncthreads()
    if tid == 0:
        total = float32(0.0)
        for s in range(nsp):
            total += sm[ws + s] * l_part[row, s]
        sm[inv] = float32(1.0) / total
    cuda.syncthreads()
    scl = sm[inv]
    for c in range(tid, width, THREADS):
        a = float32(0.0)
        for s in range(nsplit):
            a += sm[ws + s] * acc_part[row, s, c]
        sm[ys + c] = a * scl
    cuda.syncthreads()
    src = ys
    if qjl:  # fold the QJL columns into the centroid columns: z = y[:d] + y[d:] @ S
        for c in range(tid, d, THREADS):
            gi = c // g
            i = c - gi * g
            a = sm[ys + c]
            for k in range(g):
                a += sm[ys + d + gi * g + k] * proj[gi, k, i]
            sm[zs + c] = a
        cuda.syncthreads()
        src = zs
    for c in range(tid, d, THREADS):
        gi = c // g
        i = c - gi * g
        a = float32(0.0)
        for k in range(g):
            a += sm[src + gi * g + k] * rot[gi, k, i]
        dst = min(int32(chans[row // per_stream, c]), d - 1) if has_ch else c
        if nsp > nsplit:
            a += sm[ws + nsplit] * acc_part[row, nsplit, dst] * scl
        out[row, dst] = a
