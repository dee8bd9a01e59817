// Encode, decode and scores kernels of one codec configuration (macros C_*, see tq_common.cuh).
//
//   tq_energy   grid (streams, ceil(d/32), row chunks), block (32, 8): per stream and channel the
//               sum of squares over rows in float64 (atomics over row chunks), for the outlier
//               channel choice (ranked on the host side with array ops, no sync).
//   tq_encode   grid (ceil(n/ENC_TV), streams), block ENC_THREADS: ENC_TV vectors per block, held
//               transposed; norms in float64, register-blocked rotation (rotation^T table read
//               coalesced), codes = number of boundaries strictly below y, residual, QJL signs, then
//               the record assembled byte by byte in shared memory, written out as 32-bit words.
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

// Encode: ENC_TV vectors per block of ENC_THREADS threads. Inputs are kept TRANSPOSED in shared
// memory (xt[pos][v], rows padded to TVP floats) so that, in the rotation, each thread owns one
// output coordinate i for VPT vectors and reads VPT inputs per j as 16-byte broadcast loads: VPT
// FMAs per rotation-table load and per VPT/4 shared loads (the old kernel did one shared load per FMA
// and left half its threads idle at g = 64). Quantisation compares against boundaries held in
// registers; records are assembled a byte at a time from the few codes overlapping each byte.
#define ENC_THREADS 256
#define ENC_TV (CC::QJL ? 16 : 32)
#define ENC_TVP (ENC_TV + 4)

template <int G, int NV>
struct EncShape {
  static constexpr int VPT = NV * G / ENC_THREADS;  // vectors per thread in the rotation
  static constexpr int SETS = NV / VPT;              // vector sets; thread = set * G + i
  static_assert(VPT >= 2 && VPT % 2 == 0 && NV % VPT == 0, "encode tiling");
};

// acc[k] = sum_j tab[j * G + i] * in[(G0 + j) * ENC_TVP + v0 + k], k < VPT (tab is a transposed matrix).
template <int G, int VPT>
__device__ __forceinline__ void enc_matvec(const float* __restrict__ tab, const float* in, int G0, int i,
                                           int v0, float (&acc)[VPT]) {
#pragma unroll
  for (int k = 0; k < VPT; ++k) acc[k] = 0.f;
#pragma unroll 4
  for (int j = 0; j < G; ++j) {
    const float r = __ldg(tab + j * G + i);
    const float* row = in + (G0 + j) * ENC_TVP + v0;
    if constexpr (VPT % 4 == 0) {
#pragma unroll
      for (int k = 0; k < VPT; k += 4) {
        const float4 x4 = *reinterpret_cast<const float4*>(row + k);
        acc[k] = fmaf(r, x4.x, acc[k]);
        acc[k + 1] = fmaf(r, x4.y, acc[k + 1]);
        acc[k + 2] = fmaf(r, x4.z, acc[k + 2]);
        acc[k + 3] = fmaf(r, x4.w, acc[k + 3]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VPT; k += 2) {
        const float2 x2 = *reinterpret_cast<const float2*>(row + k);
        acc[k] = fmaf(r, x2.x, acc[k]);
        acc[k + 1] = fmaf(r, x2.y, acc[k + 1]);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(ENC_THREADS)
    tq_encode(const void* __restrict__ x, const u16* __restrict__ chans, int n,
              const float* __restrict__ tab, u8* __restrict__ rec) {
  constexpr int D = CC::D, R = CC::R, EV = ENC_TV;
  __shared__ __align__(16) float xt[D * ENC_TVP];
  __shared__ __align__(16) float rt_[CC::QJL ? D * ENC_TVP : 4];
  __shared__ u8 codes[EV][D];
  __shared__ u8 signs[CC::QJL ? EV : 1][D];
  __shared__ __align__(4) u8 recs[EV][R];
  __shared__ double nrm[EV][2];
  __shared__ float inv[EV];
  const int s = blockIdx.y, v0 = blockIdx.x * EV;
  const int nv = min(EV, n - v0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = ENC_THREADS / 32;
  for (int k = tid; k < EV * D; k += ENC_THREADS) {
    const int v = k / D, pos = k % D;
    const int ch = chans ? chans[static_cast<u64>(s) * D + pos] : pos;
    xt[pos * ENC_TVP + v] = v < nv ? load_float<IN_KIND>(x, (static_cast<u64>(s) * n + v0 + v) * D + ch) : 0.f;
  }
  __syncthreads();
  static_for<0, CC::NG>([&](auto gi) {
    constexpr int g = decltype(gi)::value, G = CC::gdim(g), G0 = CC::gstart(g), NB = (1 << CC::gbits(g)) - 1;
    using Sh = EncShape<G, EV>;
    for (int v = warp; v < EV; v += nw) {
      double a = 0.0;
      for (int j = lane; j < G; j += 32) {
        const double e = xt[(G0 + j) * ENC_TVP + v];
        a += e * e;
      }
      for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
      if (lane == 0) {
        const double nr = sqrt(a);
        nrm[v][0] = nr;
        inv[v] = nr > 0.0 ? static_cast<float>(1.0 / nr) : 1.f;
      }
    }
    __syncthreads();
    const float* cent = tab + CC::gcent(g);
    float bnd[NB];
#pragma unroll
    for (int k = 0; k < NB; ++k) bnd[k] = __ldg(tab + CC::gbnd(g) + k);
    if (tid < Sh::SETS * G) {
      const int i = tid % G, vs = (tid / G) * Sh::VPT;
      float acc[Sh::VPT];
      enc_matvec<G, Sh::VPT>(tab + CC::grott(g), xt, G0, i, vs, acc);
#pragma unroll
      for (int k = 0; k < Sh::VPT; ++k) {
        const float y = acc[k] * inv[vs + k];
        int c = 0;
#pragma unroll
        for (int b = 0; b < NB; ++b) c += bnd[b] < y;
        codes[vs + k][G0 + i] = static_cast<u8>(c);
        if constexpr (CC::QJL) rt_[(G0 + i) * ENC_TVP + vs + k] = y - __ldg(cent + c);
      }
    }
    __syncthreads();
    if constexpr (CC::QJL) {
      for (int v = warp; v < EV; v += nw) {
        double a = 0.0;
        for (int j = lane; j < G; j += 32) {
          const double e = rt_[(G0 + j) * ENC_TVP + v];
          a += e * e;
        }
        for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0) nrm[v][1] = sqrt(a) * nrm[v][0];
      }
      if (tid < Sh::SETS * G) {
        const int i = tid % G, vs = (tid / G) * Sh::VPT;
        float acc[Sh::VPT];
        enc_matvec<G, Sh::VPT>(tab + CC::gprojt(g), rt_, G0, i, vs, acc);
#pragma unroll
        for (int k = 0; k < Sh::VPT; ++k) signs[vs + k][G0 + i] = acc[k] >= 0.f;
      }
      __syncthreads();
    }
    // Norm halves of this group straight into the record buffer.
    for (int v = tid; v < EV; v += ENC_THREADS) {
      *reinterpret_cast<u16*>(&recs[v][CC::gnorm(g)]) = d2h(nrm[v][0]);
      if constexpr (CC::QJL) *reinterpret_cast<u16*>(&recs[v][CC::gnorm(g) + 2]) = d2h(nrm[v][1]);
    }
    __syncthreads();
  });
  // Code and sign bytes (LSB-first streams): byte b of a B-bit stream holds bits [8b, 8b + 8), i.e.
  // codes 8b/B .. (8b + 7)/B; padding bytes are zero.
  constexpr int NORM_BYTES = 2 * CC::NG * (1 + CC::QJL);
  for (int k = tid; k < EV * R; k += ENC_THREADS) {
    const int v = k / R, b = k % R;
    if (b < NORM_BYTES) continue;
    u32 val = 0;
    static_for<0, CC::NG>([&](auto gi) {
      constexpr int g = decltype(gi)::value, G = CC::gdim(g), G0 = CC::gstart(g), B = CC::gbits(g);
      if (b >= CC::gcode(g) && b < CC::gcode(g) + G * B / 8) {
        const int p0 = 8 * (b - CC::gcode(g));
        const int c0 = p0 / B;
#pragma unroll
        for (int q = 0; q < (8 + B - 1) / B + 1; ++q) {
          const int c = c0 + q, sh = c * B - p0;
          if (sh < 8 && c < G) {
            const u32 code = codes[v][G0 + c];
            val |= sh >= 0 ? code << sh : code >> (-sh);
          }
        }
      }
      if constexpr (CC::QJL) {
        if (b >= CC::gsign(g) && b < CC::gsign(g) + G / 8) {
          const int p0 = 8 * (b - CC::gsign(g));
#pragma unroll
          for (int q = 0; q < 8; ++q) val |= static_cast<u32>(signs[v][G0 + p0 + q]) << q;
        }
      }
    });
    recs[v][b] = static_cast<u8>(val & 0xffu);
  }
  __syncthreads();
  u32* dst = reinterpret_cast<u32*>(rec + (static_cast<u64>(s) * n + v0) * R);
  const u32* src = reinterpret_cast<const u32*>(&recs[0][0]);
  for (int k = tid; k < nv * R / 4; k += ENC_THREADS) dst[k] = src[k];
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
