// Encode, decode and scores kernels of one codec configuration (macros C_*, see tq_common.cuh).
//
//   tq_energy   grid (streams, ceil(d/32), row chunks), block (32, 8): per stream and channel the
//               sum of squares over rows in float64 (atomics over row chunks), for the outlier
//               channel choice (ranked on the host side with array ops, no sync).
//   tq_encode   grid (ceil(n/TV), streams), block 128: TV vectors per block; load in record channel
//               order, norms in float64, rotate (rotation^T table read coalesced), codes = number of
//               boundaries strictly below y, residual, QJL signs, then the record assembled byte by
//               byte in shared memory and written out as 32-bit words.
//   tq_decode   grid (ceil(n/TV), streams), block 128: values in the rotated domain, S^T signs,
//               rotation^T, scatter through channels; float32 out.
//   tq_qrot     grid (rows), block 128: a query row in key channel order, rotated per field.
//   tq_scores   grid (ceil(n/TV), streams), block 128: per key tile, expanded field values in shared
//               memory, then every (query, key) inner product in float32.
// All arrays are C-contiguous: x (streams, n, d), records (streams, n, R), channels (streams, d).
#include "tq_common.cuh"

TQ_CODEC(CC, C)

#define TV 16  // vectors per block: the rotation table is reused TV times per load

extern "C" __global__ void tq_energy(const void* __restrict__ x, int n, int rows_per_chunk,
                                     double* __restrict__ energy) {
  constexpr int D = CC::D;
  const int s = blockIdx.x, ch = blockIdx.y * 32 + threadIdx.x;
  const int r0 = blockIdx.z * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
  __shared__ double part[8][32];
  double a = 0.0;
  if (ch < D)
    for (int r = r0 + threadIdx.y; r < r1; r += 8) {
      const double v = load_float<IN_KIND>(x, (static_cast<u64>(s) * n + r) * D + ch);
      a += v * v;
    }
  part[threadIdx.y][threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.y == 0 && ch < D) {
    double t = 0.0;
    for (int k = 0; k < 8; ++k) t += part[k][threadIdx.x];
    atomicAdd(energy + static_cast<u64>(s) * D + ch, t);
  }
}

extern "C" __global__ void tq_encode(const void* __restrict__ x, const u16* __restrict__ chans, int n,
                                     const float* __restrict__ tab, u8* __restrict__ rec) {
  constexpr int D = CC::D, R = CC::R;
  __shared__ float xs[TV][D];
  __shared__ float rs[TV][D];
  __shared__ u8 codes[TV][D];
  __shared__ u8 signs[TV][D];
  __shared__ __align__(4) u8 recs[TV][R];
  __shared__ double nrm[TV][2];
  const int s = blockIdx.y, v0 = blockIdx.x * TV;
  const int nv = min(TV, n - v0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int k = threadIdx.x; k < TV * D; k += blockDim.x) {
    const int v = k / D, pos = k % D;
    const int ch = chans ? chans[static_cast<u64>(s) * D + pos] : pos;
    xs[v][pos] = v < nv ? load_float<IN_KIND>(x, (static_cast<u64>(s) * n + v0 + v) * D + ch) : 0.f;
  }
  __syncthreads();
  static_for<0, CC::NG>([&](auto gi) {
    constexpr int g = decltype(gi)::value, G = CC::gdim(g), G0 = CC::gstart(g), NB = (1 << CC::gbits(g)) - 1;
    for (int v = warp; v < TV; v += nw) {
      double a = 0.0;
      for (int j = lane; j < G; j += 32) a += static_cast<double>(xs[v][G0 + j]) * xs[v][G0 + j];
      for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
      if (lane == 0) nrm[v][0] = sqrt(a);
    }
    __syncthreads();
    const float* rt = tab + CC::grott(g);
    const float* bnd = tab + CC::gbnd(g);
    const float* cent = tab + CC::gcent(g);
    for (int i = threadIdx.x; i < G; i += blockDim.x) {
      float acc[TV];
#pragma unroll
      for (int v = 0; v < TV; ++v) acc[v] = 0.f;
      for (int j = 0; j < G; ++j) {
        const float r = rt[j * G + i];
#pragma unroll
        for (int v = 0; v < TV; ++v) acc[v] = fmaf(r, xs[v][G0 + j], acc[v]);
      }
#pragma unroll
      for (int v = 0; v < TV; ++v) {
        const double nv_ = nrm[v][0];
        const float y = nv_ > 0.0 ? static_cast<float>(acc[v] / nv_) : acc[v];
        int c = 0;
        for (int k = 0; k < NB; ++k) c += bnd[k] < y;
        codes[v][G0 + i] = static_cast<u8>(c);
        rs[v][G0 + i] = y - cent[c];
      }
    }
    __syncthreads();
    if constexpr (CC::QJL) {
      for (int v = warp; v < TV; v += nw) {
        double a = 0.0;
        for (int j = lane; j < G; j += 32) a += static_cast<double>(rs[v][G0 + j]) * rs[v][G0 + j];
        for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0) nrm[v][1] = sqrt(a) * nrm[v][0];
      }
      const float* st = tab + CC::gprojt(g);
      for (int i = threadIdx.x; i < G; i += blockDim.x) {
        float acc[TV];
#pragma unroll
        for (int v = 0; v < TV; ++v) acc[v] = 0.f;
        for (int j = 0; j < G; ++j) {
          const float r = st[j * G + i];
#pragma unroll
          for (int v = 0; v < TV; ++v) acc[v] = fmaf(r, rs[v][G0 + j], acc[v]);
        }
#pragma unroll
        for (int v = 0; v < TV; ++v) signs[v][G0 + i] = acc[v] >= 0.f;
      }
      __syncthreads();
    }
    // Norm halves of this group straight into the record buffer.
    for (int v = threadIdx.x; v < TV; v += blockDim.x) {
      u16 h0 = d2h(nrm[v][0]);
      *reinterpret_cast<u16*>(&recs[v][CC::gnorm(g)]) = h0;
      if constexpr (CC::QJL) *reinterpret_cast<u16*>(&recs[v][CC::gnorm(g) + 2]) = d2h(nrm[v][1]);
    }
    __syncthreads();
  });
  // Code and sign bytes (LSB-first streams); padding bytes are zero.
  constexpr int NORM_BYTES = 2 * CC::NG * (1 + CC::QJL);
  for (int k = threadIdx.x; k < TV * R; k += blockDim.x) {
    const int v = k / R, b = k % R;
    if (b < NORM_BYTES) continue;
    u32 val = 0;
    static_for<0, CC::NG>([&](auto gi) {
      constexpr int g = decltype(gi)::value, G = CC::gdim(g), G0 = CC::gstart(g), B = CC::gbits(g);
      if (b >= CC::gcode(g) && b < CC::gcode(g) + G * B / 8) {
        const int p0 = 8 * (b - CC::gcode(g));
        for (int q = 0; q < 8; ++q) val |= ((codes[v][G0 + (p0 + q) / B] >> ((p0 + q) % B)) & 1u) << q;
      }
      if constexpr (CC::QJL) {
        if (b >= CC::gsign(g) && b < CC::gsign(g) + G / 8) {
          const int p0 = 8 * (b - CC::gsign(g));
          for (int q = 0; q < 8; ++q) val |= static_cast<u32>(signs[v][G0 + p0 + q]) << q;
        }
      }
    });
    recs[v][b] = static_cast<u8>(val);
  }
  __syncthreads();
  u32* dst = reinterpret_cast<u32*>(rec + (static_cast<u64>(s) * n + v0) * R);
  const u32* src = reinterpret_cast<const u32*>(&recs[0][0]);
  for (int k = threadIdx.x; k < nv * R / 4; k += blockDim.x) dst[k] = src[k];
}

// Expanded field values of one record: vals[foff(f) + i] = table value of code i of field f,
// scl[f] = its per-vector scale (norm, or residual norm * qjl scale for sign fields).
template <class Cd>
__device__ void expand_record(const u8* r, const float* __restrict__ tab, float* vals, float* scl, int tid,
                              int nthreads) {
  static_for<0, Cd::nf()>([&](auto fi) {
    constexpr int f = decltype(fi)::value, G = Cd::fdim(f), B = Cd::fbits(f);
    const float* cent = tab + Cd::gcent(Cd::fgroup(f));
    for (int i = tid; i < G; i += nthreads) {
      const u32 c = code_at(r, Cd::fbitoff(f) + i * B, B);
      vals[Cd::foff(f) + i] = Cd::fsign(f) ? (c ? 1.f : -1.f) : cent[c];
    }
    if (tid == 0) scl[f] = rec_half(r, Cd::fscale(f)) * Cd::ffactor(f);
  });
}

extern "C" __global__ void tq_decode(const u8* __restrict__ rec, const u16* __restrict__ chans, int n,
                                     const float* __restrict__ tab, float* __restrict__ out) {
  constexpr int D = CC::D, R = CC::R, FD = CC::fdims(), NF = CC::nf();
  __shared__ float vals[TV][FD];
  __shared__ float scl[TV][NF];
  __shared__ float zs[TV][D];
  const int s = blockIdx.y, v0 = blockIdx.x * TV, nv = min(TV, n - v0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int v = warp; v < TV; v += nw) {
    if (v < nv) {
      expand_record<CC>(rec + (static_cast<u64>(s) * n + v0 + v) * R, tab, vals[v], scl[v], lane, 32);
    } else {
      for (int i = lane; i < FD; i += 32) vals[v][i] = 0.f;
      if (lane < NF) scl[v][lane] = 0.f;
    }
  }
  __syncthreads();
  static_for<0, CC::NG>([&](auto gi) {
    constexpr int g = decltype(gi)::value, G = CC::gdim(g), G0 = CC::gstart(g), fc = g * (1 + CC::QJL);
    for (int i = threadIdx.x; i < G; i += blockDim.x) {
      float acc[TV];
#pragma unroll
      for (int v = 0; v < TV; ++v) acc[v] = scl[v][fc] * vals[v][CC::foff(fc) + i];
      if constexpr (CC::QJL) {
        const float* S = tab + CC::gproj(g);
        float sacc[TV];
#pragma unroll
        for (int v = 0; v < TV; ++v) sacc[v] = 0.f;
        for (int j = 0; j < G; ++j) {
          const float w = S[j * G + i];
#pragma unroll
          for (int v = 0; v < TV; ++v) sacc[v] = fmaf(w, vals[v][CC::foff(fc + 1) + j], sacc[v]);
        }
#pragma unroll
        for (int v = 0; v < TV; ++v) acc[v] = fmaf(scl[v][fc + 1], sacc[v], acc[v]);
      }
#pragma unroll
      for (int v = 0; v < TV; ++v) zs[v][G0 + i] = acc[v];
    }
  });
  __syncthreads();
  static_for<0, CC::NG>([&](auto gi) {
    constexpr int g = decltype(gi)::value, G = CC::gdim(g), G0 = CC::gstart(g);
    const float* Rm = tab + CC::grot(g);
    for (int i = threadIdx.x; i < G; i += blockDim.x) {
      float acc[TV];
#pragma unroll
      for (int v = 0; v < TV; ++v) acc[v] = 0.f;
      for (int j = 0; j < G; ++j) {
        const float w = Rm[j * G + i];
#pragma unroll
        for (int v = 0; v < TV; ++v) acc[v] = fmaf(w, zs[v][G0 + j], acc[v]);
      }
      const int ch = chans ? chans[static_cast<u64>(s) * D + G0 + i] : G0 + i;
      for (int v = 0; v < nv; ++v) out[(static_cast<u64>(s) * n + v0 + v) * D + ch] = acc[v];
    }
  });
}

extern "C" __global__ void tq_qrot(const void* __restrict__ q, const u16* __restrict__ chans,
                                   int rows_per_stream, const float* __restrict__ tab, float* __restrict__ qf) {
  constexpr int D = CC::D, FD = CC::fdims();
  __shared__ float qp[D], out[FD];
  const int row = blockIdx.x, s = row / rows_per_stream;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const int ch = chans ? chans[static_cast<u64>(s) * D + i] : i;
    qp[i] = load_float<IN_KIND>(q, static_cast<u64>(row) * D + ch);
  }
  __syncthreads();
  rotate_fields<CC>(tab, qp, out);
  for (int i = threadIdx.x; i < FD; i += blockDim.x) qf[static_cast<u64>(row) * FD + i] = out[i];
}

extern "C" __global__ void tq_scores(const u8* __restrict__ rec, const float* __restrict__ qf, int n, int m,
                                     const float* __restrict__ tab, float* __restrict__ out) {
  constexpr int R = CC::R, FD = CC::fdims(), NF = CC::nf();
  __shared__ float vals[TV][FD];
  __shared__ float scl[TV][NF];
  const int s = blockIdx.y, v0 = blockIdx.x * TV, nv = min(TV, n - v0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int v = warp; v < nv; v += nw)
    expand_record<CC>(rec + (static_cast<u64>(s) * n + v0 + v) * R, tab, vals[v], scl[v], lane, 32);
  __syncthreads();
  for (int k = threadIdx.x; k < m * nv; k += blockDim.x) {
    const int qi = k / nv, v = k % nv;
    const float* qr = qf + (static_cast<u64>(s) * m + qi) * FD;
    float tot = 0.f;
    static_for<0, NF>([&](auto fi) {
      constexpr int f = decltype(fi)::value, G = CC::fdim(f), O = CC::foff(f);
      float a = 0.f;
      for (int i = 0; i < G; ++i) a = fmaf(qr[O + i], vals[v][O + i], a);
      tot = fmaf(scl[v][f], a, tot);
    });
    out[(static_cast<u64>(s) * m + qi) * n + v0 + v] = tot;
  }
}
