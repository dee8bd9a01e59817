"""Numba CUDA backend: straightforward reference kernels for the GPU (and Numba's CUDA simulator).

Layout owned here
-----------------
Inputs are viewed as 2-D row arrays: ``x`` (*lead, n, d) -> (rows, d), records -> (rows, record_bytes);
row ``r`` belongs to stream ``r // rows_per_stream`` (its channel permutation). bfloat16 inputs travel
as their uint16 bit patterns (``asarray`` re-labels them; every float op widens them in-kernel).
On a GPU, arrays travel as ``numba_launch.DeviceView`` and kernels are launched by
``numba_launch.launch`` (Numba's own launch path costs more than the attention kernels run);
outputs come from cuda.core's stream-ordered pool.

Per configuration and device, ``_tables`` uploads float32 copies of the host tables of
``transforms.tables`` stacked over groups, ``(groups, g, g)``: ``rot`` (R), ``rot_t`` (R^T), ``proj``
(S), ``proj_t`` (S^T), plus centroids and boundaries padded to 16 entries, and an int32 ``meta``
row per group (byte offsets and code width). Every group of one configuration has the same ``g``.

The "extended rotated row" of a vector is the common currency of every kernel: ``W = d`` columns
``norm_g * centroid[code]`` (groups in record order) and, in prod mode, ``d`` more columns
``gamma_g * qjl_scale * (+-1)``. A decoded vector is ``(ext[:d] + ext[d:] @ S) @ R`` per group; a
score is ``ext . q_ext`` with ``q_ext = [q_rot, S q_rot]``, so keys are never decoded.

Threading
---------
One block of ``THREADS`` threads per tile of rows (encode, decode, query rotation, combine) or per
(split, KV head, stream) (attention, flash-decoding style); all intermediates live in one dynamic
float32 shared-memory buffer whose regions each kernel carves out by offset. Small dense products
(``rowmat``) give every thread ``VPT`` rows of one output column so each matrix load feeds ``VPT``
multiply-adds. Attention splits the sequence into chunks, keeps an online softmax per query head of
the GQA group, and a combine kernel merges the splits and the raw tail split, then undoes S and R once
per output row.

Attention's fast path (``_build_fast_attention``, used whenever V's extended width is a multiple of
32) is warp-level instead: one warp per (stream, split), lane j scoring key j of a 32-key tile,
warp-shuffle online softmax, lane l accumulating V's extended columns l*CPL.. in registers; the
block kernel above then only runs the raw tail split. ``_combine_rows_kernel`` merges either.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _interop
from .._ops import Availability
from ..config import CodecConfig
from ..encoded import Encoded
from ..transforms import tables as host_tables

try:  # numba-cuda must never break ``import turboquant_codec``: report the failure instead.
    from numba import config as _nb_config
    from numba import cuda, float32, int32, int64, uint32, uint64

    from . import numba_launch
    from .numba_launch import DeviceView

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the installed numpy/numba pair
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# float16 norms: larger norms would be stored as inf (same limit as the reference).
FLOAT16_MAX = 65504.0
# Threads per block: 4 warps keep several blocks resident per SM and simulator grids cheap.
THREADS = 128
# Rows per thread in rowmat: each loaded matrix element feeds this many multiply-adds.
VPT = 4
# Codebooks have at most 2**4 centroids (4 code bits); tables are padded to this width.
MAX_CENTROIDS = 16
# Shared memory one block may use without opting in to more (the portable CUDA default).
SMEM_LIMIT = 48 * 1024
# Attention blocks wanted per KV stream batch: a few per SM of an H100 (132 SMs) hides latency.
TARGET_BLOCKS = 4 * 132
# 2**-25: the float16 exponent bias plus 10 fraction bits (``_half_at``).
POW2_M25 = np.float32(2.0**-25)
# Initial running max of the online softmax.
NEG_INF = -math.inf
# Key tiles of attention: one warp-width of keys per step when shared memory allows.
KEY_TILES = (32, 16, 8)
# Warp attention: lanes per warp, keys per tile, and resident warps per SM its split count aims at.
WARP = 32
TILE = 32
WARPS_PER_SM = 32
# Register cap of the warp attention kernel (None: the compiler's choice); the benchmark tries both.
ATTN_MAX_REGISTERS: int | None = None
# Warp attention: load the next key tile's record words into registers while working on this one
# (hides global latency, costs ~KWORDS+VWORDS registers); the benchmark times both.
ATTN_PREFETCH = False


def _simulated() -> bool:
    """Whether Numba runs kernels in its CUDA simulator (NUMBA_ENABLE_CUDASIM=1 at import)."""
    return bool(getattr(_nb_config, "ENABLE_CUDASIM", False))


def _view(x: Any) -> Any:
    """A GPU array as kernels here take it: a ``DeviceView`` (the simulator's own arrays there)."""
    return x if x is None or _simulated() else DeviceView.of(x)


def _empty(shape: tuple[int, ...], dtype: Any, device: int) -> Any:
    """A new output array on ``device`` (stream-ordered pool memory; Numba's arrays in the simulator)."""
    if _simulated():
        return cuda.device_array(shape, dtype)
    return numba_launch.empty(shape, dtype, device)


def availability() -> Availability:
    """Whether Numba CUDA can run here, with the reason when it cannot."""
    if _IMPORT_ERROR is not None:
        return Availability(False, f"numba-cuda failed to import: {_IMPORT_ERROR}")
    if _simulated():
        return Availability(True, "CUDA simulator")
    try:
        if not cuda.is_available():
            return Availability(False, "no CUDA driver: numba.cuda.is_available() is False")
        name = cuda.get_current_device().name
        return Availability(True, name.decode() if isinstance(name, bytes) else str(name))
    except Exception as exc:
        return Availability(False, f"no CUDA driver: {type(exc).__name__}: {exc}")


def asarray(x: Any) -> Any:
    """A GPU array over ``x``: zero-copy for GPU arrays, a device copy for host arrays.

    On a GPU, arrays come back as ``numba_launch.DeviceView`` (a pointer, shape and dtype: cheap to
    make and to launch with), host copies as Numba device arrays; under the simulator, as its
    device arrays. bfloat16 (``__cuda_array_interface__`` typestr ``<V2``, or ml_dtypes on the
    host) comes back as uint16 of the same bits, which every kernel here reads as bfloat16.
    """
    iface = getattr(x, "__cuda_array_interface__", None)  # a property: torch builds it per read
    if iface is not None:
        if not _simulated():
            return DeviceView.of(x, iface)
        if iface["typestr"] in ("<V2", "|V2"):
            return cuda.as_cuda_array(_Relabelled(iface, "<u2"))
        return cuda.as_cuda_array(x)
    host = np.ascontiguousarray(np.asarray(x))
    if host.dtype.kind == "V" or host.dtype.name == "bfloat16":
        host = host.view(np.uint16)
    return cuda.to_device(host)


class _Relabelled:
    """A CUDA array interface re-labelled with another dtype of the same size (bfloat16 -> uint16)."""

    def __init__(self, iface: dict[str, Any], typestr: str) -> None:
        self.__cuda_array_interface__ = {**iface, "typestr": typestr, "descr": [("", typestr)]}


# ----------------------------------------------------------------------------- device functions
if _IMPORT_ERROR is None:

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
    def _f16_bits(v):  # pragma: no cover
        """IEEE half bits of a finite non-negative float32, round to nearest even (as NumPy)."""
        if v < 6.103515625e-05:  # below the smallest normal half: subnormal steps of 2**-24
            return _round_even(v * 16777216.0)
        m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= m < 1
        mant = _round_even(float32(math.ldexp(m, 11)) - 1024.0)  # 10 fraction bits; may carry
        return ((e + 14) << 10) + mant

    @cuda.jit(device=True, inline="always")
    def _f16_value(lo, hi):  # pragma: no cover
        """float32 value of the non-negative half whose little-endian bytes are ``lo, hi``."""
        h = int32(lo) | (int32(hi) << 8)
        e = (h >> 10) & 0x1F
        m = h & 0x3FF
        if e == 0:
            return float32(math.ldexp(float32(m), -24))
        return float32(math.ldexp(float32(m + 1024), int(e - 25)))

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
        """Column ``c`` of the extended rotated row of record ``row`` (see the module docstring)."""
        if c < d:
            gi = c // g
            i = c - gi * g
            bits = meta[gi, 1]
            code = _bits_at(rec, row, meta[gi, 0] * 8 + i * bits, bits)
            at = meta[gi, 3]
            return _f16_value(rec[row, at], rec[row, at + 1]) * cent[gi, code]
        c -= d
        gi = c // g
        i = c - gi * g
        at = meta[gi, 3] + 2
        gamma = _f16_value(rec[row, at], rec[row, at + 1]) * qjl_scale
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
            src = int32(chans[row // per_stream, c]) if has_ch else c
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
        """Euclidean norm of each (row, group) of ``sm[src]`` into ``sm[dst + v*2*ngroups + 2*gi + slot]``."""
        for idx in range(tid, nv * ngroups, THREADS):
            v = idx // ngroups
            gi = idx - v * ngroups
            base = src + v * d + gi * g
            s = float32(0.0)
            for k in range(g):
                s += sm[base + k] * sm[base + k]
            sm[dst + v * 2 * ngroups + 2 * gi + slot] = math.sqrt(s)

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
            h = _f16_bits(sm[ns + v * 2 * ngroups + 2 * gi + (k - gi * npg)])
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

    # ------------------------------------------------------------------------------------ kernels
    @cuda.jit
    def _encode_kernel(x, bf16, chans, has_ch, per_stream, rec, overflow, tile,
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
            if sm[ns + (idx // ngroups) * 2 * ngroups + 2 * (idx % ngroups)] > FLOAT16_MAX:
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
    def _decode_kernel(rec, chans, has_ch, per_stream, out, tile, rot, proj, cent, meta,
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
            dst = int32(chans[row // per_stream, c]) if has_ch else c
            out[row, dst] = sm[xs + idx]

    @cuda.jit
    def _query_kernel(q, bf16, chans, has_ch, per_stream, out, tile, rot_t, proj_t, g,
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
    def _scores_kernel(qext, rec, out, tile, d, cent, meta, g, qjl_scale):  # pragma: no cover
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
    def _attention_kernel(qext, qraw, bf16q, krec, vrec, ktail, vtail, bf16t, n, t, chunk, nsplit,
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
    def _combine_kernel(m_part, l_part, acc_part, nsplit, chans, has_ch, per_stream, out, tile,
                        rot, proj, g, qjl):  # pragma: no cover
        """One block per ``tile`` query rows: merge the splits, undo V's S and R, add the tail split."""
        sm = cuda.shared.array(0, float32)
        tid = cuda.threadIdx.x
        rows, d = out.shape
        nsp = m_part.shape[1]
        has_tail = nsp > nsplit
        width = 2 * d if qjl else d
        row0 = cuda.blockIdx.x * tile
        nv = min(tile, rows - row0)
        ys = 0
        xs = ys + tile * width
        ws = xs + tile * d
        inv = ws + tile * nsp
        for v in range(tid, nv, THREADS):
            row = row0 + v
            m = NEG_INF
            for s in range(nsp):
                m = max(m, m_part[row, s])
            total = float32(0.0)
            for s in range(nsp):
                w = math.exp(m_part[row, s] - m) if m_part[row, s] > NEG_INF else float32(0.0)
                sm[ws + v * nsp + s] = w
                total += w * l_part[row, s]
            sm[inv + v] = 1.0 / total
        cuda.syncthreads()
        for idx in range(tid, nv * width, THREADS):
            v = idx // width
            c = idx - v * width
            a = float32(0.0)
            for s in range(nsplit):
                a += sm[ws + v * nsp + s] * acc_part[row0 + v, s, c]
            sm[ys + idx] = a * sm[inv + v]
        cuda.syncthreads()
        _unrotate(sm, ys, xs, nv, d, g, rot, proj, qjl, tid)
        for idx in range(tid, nv * d, THREADS):
            v = idx // d
            c = idx - v * d
            row = row0 + v
            dst = int32(chans[row // per_stream, c]) if has_ch else c
            val = sm[xs + idx]
            if has_tail:
                val += sm[ws + v * nsp + nsplit] * acc_part[row, nsplit, dst] * sm[inv + v]
            out[row, dst] = val

    @cuda.jit
    def _energy_kernel(x, bf16, n, chunk, partial):  # pragma: no cover
        """partial[s, k, c] = sum of x[s*n + j, c]**2 over j in chunk k, in float64, in a fixed order."""
        s = cuda.blockIdx.z
        k = cuda.blockIdx.y
        c = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
        d = x.shape[1]
        if c >= d:
            return
        acc = 0.0
        for j in range(k * chunk, min(n, (k + 1) * chunk)):
            v = float(_to_f32(x[s * n + j, c], bf16))
            acc += v * v
        partial[s, k, c] = acc



    # ------------------------------------------------------------- warp-level attention (fast path)
    if _simulated():  # the simulator has no warp intrinsics: one warp per block, block barriers

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
    def _half_at(words, base, slot):  # pragma: no cover
        """float32 value of the ``slot``-th float16 of a staged record (norms lead the record)."""
        h = int32(words[uint64(base + (slot >> 1))] >> (16 * (slot & 1))) & 0xFFFF
        e = (h >> 10) & 0x1F
        mant = (h & 0x3FF) | (0x400 if e else 0)
        # (mant) * 2**(max(e, 1) - 25): two exact float products, no ldexp (norms are finite)
        return float32(mant) * (float32(int32(1) << max(e, 1)) * POW2_M25)

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


def _fast_attention_spec(kcfg: CodecConfig, vcfg: CodecConfig, heads: int) -> dict[str, Any] | None:
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
    choices = (1,) if _simulated() else (4, 2, 1)  # the simulator's warp stand-ins need 1 warp
    warps = next((w for w in choices if fixed + w * per_warp <= SMEM_LIMIT), 0)
    if not warps:
        return None
    return dict(d=d, heads=heads, wk=wk, wv=wv, cpl=cpl, k=k, v=v, warps=warps,
                prefetch=ATTN_PREFETCH)


@functools.lru_cache(maxsize=64)
def _fast_attention_kernel(kcfg: CodecConfig, vcfg: CodecConfig, heads: int) -> tuple[Any, int] | None:
    """(kernel, warps per block) of the warp attention for one (K config, V config, GQA group)."""
    spec = _fast_attention_spec(kcfg, vcfg, heads)
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
    ``_attention_kernel`` (running max, sum, accumulator), merged by ``_combine_rows_kernel``.

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
    ALIGN = None if _simulated() else 16
    NEG = np.float32(NEG_INF)

    options: dict[str, Any] = {}
    if ATTN_MAX_REGISTERS is not None:
        options["max_registers"] = ATTN_MAX_REGISTERS

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
                val = _half_at(vs, vso + lane * VP, s)
                vsc[s] = val * VQS if (VQJL and (s & 1)) else val
            _key_part(ks, kb, qs, kt0, part, G, KB0, KCO0 * 8, 0, KG, KCH)
            nrm = _half_at(ks, kb, 0)
            for h in range(G):
                sc[h] = part[h] * nrm
            if KNG == 2:
                _key_part(ks, kb, qs, kt1, part, G, KB1, KCO1 * 8, KG, KG, KCH)
                nrm = _half_at(ks, kb, KNPG)
                for h in range(G):
                    sc[h] += part[h] * nrm
            if KQJL:
                _key_part(ks, kb, qs, kts, part, G, 1, KSO0 * 8, D, KG, KCH)
                nrm = _half_at(ks, kb, 1) * KQS
                for h in range(G):
                    sc[h] += part[h] * nrm
                if KNG == 2:
                    _key_part(ks, kb, qs, kts, part, G, 1, KSO1 * 8, D + KG, KG, KCH)
                    nrm = _half_at(ks, kb, 3) * KQS
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


if _IMPORT_ERROR is None:

    @cuda.jit
    def _combine_rows_kernel(m_part, l_part, acc_part, nsplit, chans, has_ch, per_stream, out,
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
            dst = int32(chans[row // per_stream, c]) if has_ch else c
            if nsp > nsplit:
                a += sm[ws + nsplit] * acc_part[row, nsplit, dst] * scl
            out[row, dst] = a



# ---------------------------------------------------------------------------------------- host side
@dataclass(frozen=True)
class _Tables:
    """Device copies of one configuration's tables (see the module docstring)."""

    rot: Any
    rot_t: Any
    proj: Any
    proj_t: Any
    cent: Any
    bnd: Any
    meta: Any
    g: int
    ngroups: int
    qjl: bool
    qjl_scale: float

    def width(self, d: int) -> int:
        """Columns of an extended rotated row."""
        return 2 * d if self.qjl else d


def _upload(host: np.ndarray) -> Any:
    return _view(cuda.to_device(np.ascontiguousarray(host)))


def _stack(mats: list[np.ndarray]) -> Any:
    return _upload(np.stack(mats).astype(np.float32))


@functools.lru_cache(maxsize=128)
def _device_tables(cfg: CodecConfig, device: int) -> _Tables:
    """Upload the host tables of ``cfg`` to GPU ``device`` once (the caller holds its context)."""
    host = host_tables(cfg)
    groups = cfg.groups
    cent = np.zeros((len(groups), MAX_CENTROIDS), np.float32)
    bnd = np.full((len(groups), MAX_CENTROIDS), np.inf, np.float32)
    meta = np.zeros((len(groups), 8), np.int32)
    for i, (grp, tab) in enumerate(zip(groups, host, strict=True)):
        cent[i, : tab.centroids.size] = tab.centroids
        bnd[i, : tab.boundaries.size] = tab.boundaries
        meta[i, :5] = (grp.code_offset, grp.code_bits, max(grp.sign_offset, 0), grp.norm_offset,
                       tab.boundaries.size)
    qjl = cfg.mode == "prod"
    proj = [t.projection if t.projection is not None else np.zeros((1, 1)) for t in host]
    return _Tables(
        rot=_stack([t.rotation for t in host]),
        rot_t=_stack([t.rotation.T for t in host]),
        proj=_stack(proj),
        proj_t=_stack([p.T for p in proj]),
        cent=_upload(cent),
        bnd=_upload(bnd),
        meta=_upload(meta),
        g=groups[0].dim,
        ngroups=len(groups),
        qjl=qjl,
        qjl_scale=host[0].qjl_scale,
    )


def _device_id(arr: Any) -> int:
    """Ordinal of the GPU holding ``arr`` (the current device under the simulator, for None, or for
    an array without memory).

    Asked of the array's library where it knows (torch, CuPy, cuda.core buffers): on a 2-GPU H200
    host, ``cuPointerGetAttribute(DEVICE_ORDINAL)`` answered 0 for a torch tensor on cuda:1.
    """
    if _simulated() or arr is None:
        return 0 if _simulated() else int(cuda.get_current_device().id)
    if _gpu_count() == 1:
        return 0
    owner = arr.owner if isinstance(arr, DeviceView) else arr
    lib = _interop.library_of(owner)
    if lib == "torch":
        return int(owner.device.index)
    if lib == "cupy":
        return int(owner.device.id)
    if hasattr(owner, "device_id"):  # a cuda.core Buffer: this backend's outputs
        return int(owner.device_id)
    ptr = arr.ptr if isinstance(arr, DeviceView) else arr.__cuda_array_interface__["data"][0]
    ordinal = numba_launch.device_of(ptr)
    return int(cuda.get_current_device().id) if ordinal is None else ordinal


@functools.cache
def _gpu_count() -> int:
    return len(cuda.gpus)


class _on_device:
    """Context manager: make the GPU holding ``arr`` current, so kernels and outputs live there."""

    def __init__(self, arr: Any) -> None:
        self.id = _device_id(arr)
        self._ctx: Any = None

    def __enter__(self) -> int:
        if not _simulated():
            self._ctx = cuda.gpus[self.id]
            self._ctx.__enter__()
        return self.id

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def _rows(a: Any, cols: int) -> Any:
    """A C-contiguous device array viewed as (rows, cols)."""
    if not a.is_c_contiguous():
        raise ValueError("numba_cuda needs C-contiguous arrays; make a contiguous copy first")
    return a.reshape(math.prod(a.shape) // cols, cols)


@functools.cache
def _placeholder(dtype: str, cols: int, device: int) -> Any:
    """A zero (1, cols) device array standing in for an absent input (uploaded once per device)."""
    return _upload(np.zeros((1, cols), dtype))


def _channels(channels: Any, d: int, device: int) -> tuple[Any, bool]:
    """(streams, d) channel table, or a 1x1 placeholder when channels are in natural order."""
    if channels is None:
        return _placeholder("uint16", 1, device), False
    return _rows(channels, d), True


def _is_bf16(a: Any) -> bool:
    """uint16 inputs are bfloat16 bit patterns (see ``asarray``); float inputs are read as they are."""
    return bool(np.dtype(a.dtype) == np.uint16)


def _tile(per_row_floats: int, fixed_floats: int = 0, cap: int = 32) -> int:
    """Rows per block: a multiple of VPT, at most ``cap``, within SMEM_LIMIT of float32 scratch."""
    rows = (SMEM_LIMIT // 4 - fixed_floats) // per_row_floats
    rows = min(cap, rows) // VPT * VPT
    if rows < VPT:
        raise ValueError("head dimension too large for the numba_cuda backend's shared-memory tiles")
    return rows


def _launch(kernel: Any, device: int, blocks: Any, smem_floats: int, *args: Any) -> None:
    numba_launch.launch(kernel, device, blocks, THREADS, 4 * smem_floats, *args)


def _blocks(rows: int, tile: int) -> int:
    return -(-rows // tile)


# ---------------------------------------------------------------------------------- channel choice
# Vectors per energy partial sum: long enough to amortise a thread, short enough to fill the GPU.
ENERGY_CHUNK = 1024


def _select_channels(x2: Any, streams: int, n: int, cfg: CodecConfig, device: int) -> Any:
    """``numpy_ref.select_channels`` with the float64 sums on the GPU and the ranking on the host.

    Partial sums over fixed chunks are added on the host in a fixed order, so the choice is
    deterministic; ties go to the lower channel index exactly as in the reference.
    """
    d = cfg.d
    chunks = max(1, -(-n // ENERGY_CHUNK))
    partial = _empty((streams, chunks, d), np.float64, device)
    grid = (-(-d // THREADS), chunks, streams)
    numba_launch.launch(_energy_kernel, device, grid, THREADS, 0, x2, _is_bf16(x2), n, ENERGY_CHUNK, partial)
    energy = partial.copy_to_host().sum(axis=1) / n
    order = np.argsort(-energy, axis=-1, kind="stable")
    top = np.sort(order[:, : cfg.outlier_dim], axis=-1)
    rest = np.sort(order[:, cfg.outlier_dim :], axis=-1)
    return _upload(np.concatenate([top, rest], axis=-1).astype(np.uint16))


# --------------------------------------------------------------------------------------------- ops
def encode(x: Any, cfg: CodecConfig, channels: Any) -> tuple[Any, Any]:
    """Encode ``x`` (*lead, n, d) into byte records (*lead, n, record_bytes) uint8 on its GPU.

    Parameters
    ----------
    x : GPU array (``asarray``), float16/float32, or uint16 holding bfloat16
    cfg : CodecConfig
    channels : device array (*lead, d) uint16 or None
        None with half-integer bits: chosen per stream as ``numpy_ref.select_channels``.

    Returns
    -------
    records, channels : device arrays
    """
    x, channels = _view(x), _view(channels)
    *lead, n, d = x.shape
    streams = math.prod(lead)
    rows = streams * n
    with _on_device(x) as dev:
        rec = _empty((*lead, n, cfg.record_bytes), np.uint8, dev)
        if rows == 0:
            return rec, channels
        x2 = _rows(x, d)
        if cfg.split and channels is None:
            channels = _select_channels(x2, streams, n, cfg, dev).reshape(*lead, d)
        t = _device_tables(cfg, dev)
        chans, has_ch = _channels(channels, d, dev)
        tile = _tile(3 * d + 2 * t.ngroups)
        overflow = cuda.to_device(np.zeros(1, np.int32))
        _launch(_encode_kernel, dev, _blocks(rows, tile), tile * (3 * d + 2 * t.ngroups),
                x2, _is_bf16(x2), chans, has_ch, n, _rows(rec, cfg.record_bytes), overflow, tile,
                t.rot_t, t.proj_t, t.cent, t.bnd, t.meta, t.g, t.ngroups, t.qjl)
        bad = int(overflow.copy_to_host()[0])
    if bad:
        raise ValueError(
            f"{bad} channel-group norms are above {FLOAT16_MAX:g}, the float16 norm range of the byte record"
        )
    return rec, channels


def decode(enc: Encoded) -> Any:
    """Reconstruct (*lead, n, d) float32 vectors from ``enc`` on the GPU holding its records.

    Parameters
    ----------
    enc : Encoded
        Records and channels as GPU arrays (``asarray``).

    Returns
    -------
    DeviceView (Numba device array under the simulator), float32
    """
    cfg = enc.config
    records, channels = _view(enc.records), _view(enc.channels)
    *lead, n, _ = records.shape
    d = cfg.d
    with _on_device(records) as dev:
        out = _empty((*lead, n, d), np.float32, dev)
        rows = math.prod(lead) * n
        if rows == 0:
            return out
        t = _device_tables(cfg, dev)
        chans, has_ch = _channels(channels, d, dev)
        per_row = t.width(d) + d
        tile = _tile(per_row)
        _launch(_decode_kernel, dev, _blocks(rows, tile), tile * per_row,
                _rows(records, cfg.record_bytes), chans, has_ch, n, _rows(out, d), tile,
                t.rot, t.proj, t.cent, t.meta, t.g, t.qjl, t.qjl_scale)
    return out


def _rotate_queries(q2: Any, channels: Any, per_stream: int, cfg: CodecConfig, t: _Tables,
                    device: int) -> Any:
    """(rows, W) float32 queries in the keys' extended rotated domain (one pass per query)."""
    d = cfg.d
    width = t.width(d)
    out = _empty((q2.shape[0], width), np.float32, device)
    chans, has_ch = _channels(channels, d, device)
    per_row = d + width
    tile = _tile(per_row, cap=VPT)  # few rows: one tile of VPT rows per block spreads them out
    _launch(_query_kernel, device, _blocks(q2.shape[0], tile), tile * per_row,
            q2, _is_bf16(q2), chans, has_ch, per_stream, out, tile, t.rot_t, t.proj_t, t.g, t.qjl)
    return out


def scores(q: Any, keys: Encoded) -> Any:
    """Estimated ``<q_i, k_j>`` (*lead, m, n) float32, from the codes (keys are never decoded).

    Parameters
    ----------
    q : GPU array (*lead, m, d)
    keys : Encoded (*lead, n, d)

    Returns
    -------
    DeviceView (Numba device array under the simulator), float32
    """
    cfg = keys.config
    q, records, channels = _view(q), _view(keys.records), _view(keys.channels)
    *lead, m, d = q.shape
    n = tuple(records.shape)[-2]
    streams = math.prod(lead)
    with _on_device(records) as dev:
        out = _empty((*lead, m, n), np.float32, dev)
        if streams * m * n == 0:
            return out
        t = _device_tables(cfg, dev)
        qext = _rotate_queries(_rows(q, d), channels, m, cfg, t, dev)
        width = t.width(d)
        tile = _tile(width + 1)
        _launch(_scores_kernel, dev, (_blocks(n, tile), streams), tile * (width + 1),
                qext, _rows(records, cfg.record_bytes), out.reshape(streams, m, n), tile, d,
                t.cent, t.meta, t.g, t.qjl_scale)
    return out


def _splits(tokens: int, streams: int, split_tokens: int | None, tk: int) -> tuple[int, int]:
    """(splits, tokens per split): enough blocks to fill the GPU, whole key tiles per split."""
    if split_tokens is None:
        want = max(1, -(-TARGET_BLOCKS // max(streams, 1)))
        split_tokens = -(-tokens // want)
    chunk = max(tk, -(-split_tokens // tk) * tk)
    return max(1, -(-tokens // chunk)), chunk


@functools.cache
def _sm_count(device: int) -> int:
    return 132 if _simulated() else int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def _resident_warps(regs: int | None, warps: int, device: int) -> int:
    """Warps of a kernel using ``regs`` registers per thread the GPU holds at once, for the split
    count (the simulator's answer: an H100's 132 SMs at ``WARPS_PER_SM``)."""
    if regs is None:
        return 132 * WARPS_PER_SM
    per_warp = -(-regs * WARP // 256) * 256
    return _sm_count(device) * max(1, min(WARPS_PER_SM, 65536 // per_warp) // warps * warps)


@functools.lru_cache(maxsize=32)
def _scratch(rows: int, nsp: int, width: int, device: int) -> tuple[Any, Any, Any]:
    """Split partials (max, sum, accumulator), reused across calls (one stream orders them)."""
    return (_empty((rows, nsp), np.float32, device), _empty((rows, nsp), np.float32, device),
            _empty((rows, nsp, width), np.float32, device))


def attention(
    q: Any,
    k: Encoded,
    v: Encoded,
    scale: float,
    k_tail: Any,
    v_tail: Any,
    split_tokens: int | None = None,
) -> Any:
    """Decode attention over compressed K/V plus an optional raw tail, GQA by head groups.

    Parameters
    ----------
    q : GPU array (*lead, h_q, d)
    k, v : Encoded (*lead, h_kv, n, d)
    scale : float
    k_tail, v_tail : GPU arrays (*lead, h_kv, t, d) or None
    split_tokens : int, optional
        Tokens per split of the sequence (rounded up to whole key tiles); by default enough splits
        to fill the GPU twice over.

    Returns
    -------
    DeviceView (Numba device array under the simulator) (*lead, h_q, d), float32
    """
    q, krec, vrec = _view(q), _view(k.records), _view(v.records)
    k_tail, v_tail = _view(k_tail), _view(v_tail)
    *lead, h_q, d = q.shape
    h_kv, n = tuple(krec.shape)[-3:-1]
    groups = h_q // h_kv
    batch = math.prod(lead)
    t = 0 if k_tail is None else int(tuple(k_tail.shape)[-2])
    with _on_device(krec) as dev:
        out = _empty((*lead, h_q, d), np.float32, dev)
        rows = batch * h_q
        if rows == 0:
            return out
        kt, vt = _device_tables(k.config, dev), _device_tables(v.config, dev)
        wk, wv = kt.width(d), vt.width(d)
        q2 = _rows(q, d)
        qext = _rotate_queries(q2, _view(k.channels), groups, k.config, kt, dev)
        streams = batch * h_kv
        fixed = groups * (wk + wv + 3)
        tk = next((s for s in KEY_TILES if fixed + s * (wk + wv + 2 + groups) <= SMEM_LIMIT // 4), 0)
        fast = _fast_attention_kernel(k.config, v.config, groups)
        if fast is None and tk == 0:
            raise ValueError("too many query heads per KV head for the numba_cuda attention tiles")
        krec, vrec = _rows(krec, k.config.record_bytes), _rows(vrec, v.config.record_bytes)
        if fast is not None:
            kernel, warps = fast
            kw = krec.reshape(krec.size).view(np.uint32)
            vw = vrec.reshape(vrec.size).view(np.uint32)
            if split_tokens is None:
                # Registers depend on argument types only: one-split partials stand in for the
                # real ones, whose shape waits on the split count chosen here.
                regs = numba_launch.registers(kernel, dev, qext, kw, vw, n, 0, 0, np.float32(scale),
                                              kt.cent, vt.cent, *_scratch(rows, 1, max(wv, d), dev))
                want = -(-2 * _resident_warps(regs, warps, dev) // max(streams, 1))
                split_tokens = -(-n // max(want, 1))
            nsplit, chunk = _splits(n, streams, split_tokens, TILE)
        else:
            nsplit, chunk = _splits(n, streams, split_tokens, tk)
        nsp = nsplit + (1 if t else 0)
        m_part, l_part, acc_part = _scratch(rows, nsp, max(wv, d), dev)
        if t:
            ktail2, vtail2 = _rows(k_tail, d), _rows(v_tail, d)
        else:
            ktail2 = vtail2 = _placeholder("float32", d, dev)
        if fast is not None:
            numba_launch.launch(kernel, dev, (-(-nsplit // warps), streams), warps * WARP, 0,
                                qext, kw, vw, n, chunk, nsplit, np.float32(scale), kt.cent, vt.cent,
                                m_part, l_part, acc_part)
        if fast is None or t:
            first = nsplit if fast is not None else 0
            smem = fixed + tk * (wk + wv + 2 + groups)
            _launch(_attention_kernel, dev, (nsp - first, h_kv, batch), smem,
                    qext, q2, _is_bf16(q2), krec, vrec, ktail2, vtail2, _is_bf16(ktail2), n, t, chunk,
                    nsplit, first, groups, np.float32(scale), tk, d, wk, wv,
                    kt.cent, kt.meta, kt.g, kt.qjl_scale, vt.cent, vt.meta, vt.g, vt.qjl_scale,
                    m_part, l_part, acc_part)
        chans, has_ch = _channels(_view(v.channels), d, dev)
        _launch(_combine_rows_kernel, dev, rows, nsp + 1 + wv + d,
                m_part, l_part, acc_part, nsplit, chans, has_ch, groups, _rows(out, d),
                vt.rot, vt.proj, vt.g, vt.qjl)
    return out
