// Encode, decode and scores kernels of one codec configuration (macros C_*, see tq_common.cuh).
//
//   tq_energy   grid (streams, ceil(d/32), row chunks), block (32, 8): per stream and channel the
//               sum of squares over rows in float64 (atomics over row chunks), for the outlier
//               channel choice (ranked on the host side with array ops, no sync).
//   tq_encode   grid (ceil(n/ENC_TV), streams), block ENC_THREADS: ENC_TV vectors per block, held
//               transposed; norms in float64, register-blocked rotation (rotation^T table read
//               coalesced), codes = number of boundaries strictly below y, residual, QJL signs, then
//               the record assembled byte by byte in shared memory, written out as 32-bit words.
//   tq_encode_tc  grid (SMs), block 32 * ENC_WARPS: the mse encode on tensor cores, persistent (see
//               its section below); the host picks it where cupy_raw_tc.tc_encode_ok.
//   tq_write_tc grid (blocks, 1 or 2), block 32 * ENC_WARPS: the same encode of a paged cache's new
//               tokens, read in place and scattered to their slots and raw rows (cupy_paged.paged_write).
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

// Euclidean norm, in float64, of the G values col[j * ENC_TVP] (one column of a transposed tile),
// reduced over the warp: every lane gets it.
template <int G>
__device__ __forceinline__ double warp_group_norm(const float* col, int lane) {
  double a = 0.0;
  for (int j = lane; j < G; j += 32) {
    const double e = col[j * ENC_TVP];
    a += e * e;
  }
  for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  return sqrt(a);
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
    const int ch = chans ? min(static_cast<int>(chans[static_cast<u64>(s) * D + pos]), D - 1) : pos;
    xt[pos * ENC_TVP + v] = v < nv ? load_float<IN_KIND>(x, (static_cast<u64>(s) * n + v0 + v) * D + ch) : 0.f;
  }
  __syncthreads();
  static_for<0, CC::NG>([&](auto gi) {
    constexpr int g = decltype(gi)::value, G = CC::gdim(g), G0 = CC::gstart(g), NB = (1 << CC::gbits(g)) - 1;
    using Sh = EncShape<G, EV>;
    for (int v = warp; v < EV; v += nw) {
      const double nr = warp_group_norm<G>(xt + G0 * ENC_TVP + v, lane);
      if (lane == 0) {
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
        const double nr = warp_group_norm<G>(rt_ + G0 * ENC_TVP + v, lane);
        if (lane == 0) nrm[v][1] = nr * nrm[v][0];
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
    // Norms of this group straight into the record buffer.
    for (int v = tid; v < EV; v += ENC_THREADS) {
      *reinterpret_cast<u16*>(&recs[v][CC::gnorm(g)]) = d2bf(nrm[v][0]);
      if constexpr (CC::QJL) *reinterpret_cast<u16*>(&recs[v][CC::gnorm(g) + 2]) = d2bf(nrm[v][1]);
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

// ----------------------------------------------------------------------- tensor-core encode (mse)
// tq_encode_tc: persistent grid, one block of ENC_WARPS independent warps per SM, sharing the
// fragment tables in shared memory. A warp owns tiles of TC_NV = 16 * ENC_MT vectors of one
// stream (tiles numbered across streams), staged by cp.async: the raw input rows, channel order as
// stored, unpadded with their 16-byte chunks swizzled (chunk c of row v at c ^ (v % TC_SW): the 8
// rows a gather reads hit 8 bank quads), and the stream's channel list. A tile's values go to
// registers (tc_gather) before its rotation and codes (tc_rotate), so one staging buffer per warp
// takes the next tile meanwhile. Per channel group the rotation is
// D[v][i] = sum_k x[v][pos(k)] * Rs[i(n)][pos(k)] on mma.m16n8k16 (f16 in, f32 accumulate):
//   A = the vectors (16 x 16 per m-tile and k-step), gathered from shared memory through the
//       channel permutation (thread t holds record positions t, t + 4, ..: k-step ks covers
//       positions 16 ks .. 16 ks + 15);
//   B = the rotation, scaled by 2^TC_RS_EXP and split into hi + lo parts of the input's 16-bit
//       type (bfloat16 for bfloat16 input, else float16; hi*x + lo*x: ~17 or ~22-bit products),
//       pre-arranged on the host (cupy_raw_tc.fragment_table) as one uint4 {hi_b0, hi_b1, lo_b0,
//       lo_b1} per lane, k-step and n-tile, or in wgmma's layout (below), copied to shared memory;
//   x: float16 and bfloat16 inputs go in as stored (exact, no conversion); float32 is scaled by
//       2^-e (e the exponent of the group norm, so no float16 overflow or underflow loss) and split
//       into hi + lo as well (three mma per step instead of two).
// Group norms: float16 and bfloat16 on the tensor cores too, as the diagonal of x x^T (two mma per
// m-tile and k-step, operands already in registers: exact products, float32 sums); float32 by FMAs.
// Output column n of n-tile nt is rotated coordinate i = (n / 2) * G/4 + 2 nt + n % 2, so each
// thread ends with G/4 consecutive codes of its rows: a byte-aligned piece of the code stream.
// Codes: y = acc / (2^TC_RS_EXP * |x_g|) (unit-vector units), then the number of boundaries below
// y through the group's grid (cupy_raw_tc.grid): bin k = clamp(round(y TC_GSg) + TC_GOg, 0,
// TC_GNg - 1) holds at most one boundary, which lane k of a register (and its count below, unless
// that is k) holds: warp shuffles. Records are assembled in a per-warp shared buffer and written
// out in 16-byte stores (32-bit where the tile's records are not 16-byte aligned).
// Configurations it covers: tc_encode_ok (host).
#ifndef ENC_MT
#define ENC_MT 2
#endif
#ifndef ENC_WARPS
#define ENC_WARPS 4
#endif

constexpr int TC_ES = IN_KIND == TQ_F32 ? 4 : 2;              // input bytes per value
constexpr bool TC_BF = IN_KIND == TQ_BF16;                    // bfloat16 mma operands
constexpr int TC_NV = 16 * ENC_MT;                            // vectors per warp tile
constexpr int TC_ROWB = CC::D * TC_ES;                        // staged row bytes
constexpr int TC_SW = TC_ROWB / 16 < 8 ? TC_ROWB / 16 : 8;    // rows of one swizzle period
constexpr int TC_XBYTES = TC_NV * TC_ROWB;                    // one staged tile
constexpr int TC_CBYTES = CC::D * 2;                          // one staged channel list
// uint4 offset of group g's fragment table (G^2/4 uint4 per group); g = NG: the grids' lane words.
__host__ __device__ constexpr int tc_gtab(int g) {
  return g == 0 ? 0 : tc_gtab(g - 1) + CC::gdim(g - 1) * CC::gdim(g - 1) / 4;
}
// Group g's grid (cupy_raw_tc.grid): bin scale, offset, bins, and whether a bin's count is its index.
template <int g>
struct TcGrid {
  static constexpr float S = g == 0 ? TC_GS0 : TC_GS1;
  static constexpr int O = g == 0 ? TC_GO0 : TC_GO1, N = g == 0 ? TC_GN0 : TC_GN1;
  static constexpr bool I = (g == 0 ? TC_GI0 : TC_GI1) != 0;
};
// 1.5 * 2^23: y * scale + this, rounded to nearest, stays in [2^23, 2^24) (unit ulp): its bits less
// the bias's bits are round(y * scale).
#define TC_ROUND_BIAS 12582912.f
#define TC_ROUND_BITS 0x4B400000

// Store the first NB bytes of words w at byte offset off of shared memory, in the widest units the
// compile-time alignment allows (ALIGN divides off).
template <int NB, int ALIGN, int NW>
__device__ __forceinline__ void tc_store_bytes(u8* p, const u32 (&w)[NW]) {
  if constexpr (NB % 4 == 0 && ALIGN % 4 == 0) {
#pragma unroll
    for (int k = 0; k < NB / 4; ++k) reinterpret_cast<u32*>(p)[k] = w[k];
  } else if constexpr (NB % 2 == 0 && ALIGN % 2 == 0) {
#pragma unroll
    for (int k = 0; k < NB / 2; ++k) reinterpret_cast<u16*>(p)[k] = static_cast<u16>(w[k / 2] >> (16 * (k % 2)));
  } else {
#pragma unroll
    for (int k = 0; k < NB; ++k) p[k] = static_cast<u8>(w[k / 4] >> (8 * (k % 4)));
  }
}

// Warpgroup mma (sm_90a builds only, -arch=sm_90a): the rotation tables in shared memory in the
// layout wgmma reads (per group, part hi/lo and k-step a 16 x G block of 8 x 8 core matrices:
// byte (k/8)*TC_WG_LBO + (n/8)*TC_WG_SBO + (n%8)*16 + (k%8)*2; cupy_raw_tc.wgmma_order), A from the
// same registers as mma.sync.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TC_WGMMA 1
#else
#define TC_WGMMA 0
#endif
#if TC_WGMMA
#if IN_KIND == TQ_BF16
#define TC_WG_AB "bf16.bf16"
#else
#define TC_WG_AB "f16.f16"
#endif
__device__ __forceinline__ u64 tc_wg_desc(u32 smem, int lbo, int sbo) {
  return static_cast<u64>((smem >> 4) & 0x3FFF) | (static_cast<u64>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<u64>((sbo >> 4) & 0x3FFF) << 32);
}
// d[0..N/2) (+)= A(64 x 16, this warp's 16 rows in a0..a3) * B(16 x N at desc); acc = 0: d = A*B.
template <int N>
__device__ __forceinline__ void tc_wgmma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc, int acc);
template <>
__device__ __forceinline__ void tc_wgmma<32>(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TC_WG_AB " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,"
      "%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(acc));
}
template <>
__device__ __forceinline__ void tc_wgmma<64>(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TC_WG_AB " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,"
      "%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;"
      "\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(acc));
}
__device__ __forceinline__ void tc_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void tc_wg_wait() {
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
#endif

// One channel group's share of a warp tile, held in registers between its two phases: the vectors
// as mma A fragments (16-bit pairs; float32 input adds its lo parts) and 1 / (2^TC_RS_EXP |x_g|)
// per row.
template <int g>
struct TcFrag {
  static constexpr int KS = CC::gdim(g) / 16;
  static constexpr bool F32 = IN_KIND == TQ_F32;
  u32 ah[ENC_MT][2][KS][2];
  u32 al[F32 ? ENC_MT : 1][2][F32 ? KS : 1][2];
  float inv[ENC_MT][2];
};

// Phase 1 of a group: gather its values from the staged tile xs through the channel list ch (or
// null), norms into the record buffer stg, fragments and scales into f.
template <int g>
__device__ __forceinline__ void tc_gather(const u8* xs, const u16* ch, u8* stg, int lane, TcFrag<g>& f) {
  constexpr int G = CC::gdim(g), G0 = CC::gstart(g), KS = G / 16, Q = G / 4, R = CC::R;
  constexpr bool F32 = IN_KIND == TQ_F32;
  const int r = lane >> 2, t = lane & 3;
  // Byte offsets (within a staged row, swizzled for this thread's rows: all = r mod TC_SW) of
  // this thread's Q record positions t + 4 j: one gather reads 4 neighbouring positions, whose
  // channels (ascending within a group) mostly sit in distinct bank words or share one.
  const u32 swz = static_cast<u32>(r % TC_SW) << 4;
  u32 off[Q];
#pragma unroll
  for (int j = 0; j < Q; ++j)
    off[j] = ((ch ? min(static_cast<u32>(ch[G0 + t + 4 * j]), static_cast<u32>(CC::D - 1)) : G0 + t + 4 * j) * TC_ES) ^ swz;
  // Gather: raw values of rows 16m + 8h + r at positions t + 4 (4ks + 2q + {0, 1}); one address
  // per position, rows at immediate offsets.
  u32(&ah)[ENC_MT][2][KS][2] = f.ah;
  u32(&al)[F32 ? ENC_MT : 1][2][F32 ? KS : 1][2] = f.al;
  float fv[F32 ? ENC_MT : 1][2][F32 ? KS : 1][4];  // float32 input values
  float ss[ENC_MT][2];
#pragma unroll
  for (int m = 0; m < ENC_MT; ++m) ss[m][0] = ss[m][1] = 0.f;
  const u8* rbase = xs + r * TC_ROWB;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int p = 4 * ks + 2 * q;
      const u8* p0 = rbase + off[p];
      const u8* p1 = rbase + off[p + 1];
#pragma unroll
      for (int m = 0; m < ENC_MT; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ro = (16 * m + 8 * h) * TC_ROWB;
          if constexpr (F32) {
            const float f0 = *reinterpret_cast<const float*>(p0 + ro);
            const float f1 = *reinterpret_cast<const float*>(p1 + ro);
            fv[m][h][ks][2 * q] = f0;
            fv[m][h][ks][2 * q + 1] = f1;
            ss[m][h] = fmaf(f0, f0, fmaf(f1, f1, ss[m][h]));
          } else {
            ah[m][h][ks][q] = *reinterpret_cast<const u16*>(p0 + ro) | (*reinterpret_cast<const u16*>(p1 + ro) << 16);
          }
        }
      }
    }
  }
  // Rows whose largest |x| lies outside 2^+-50 (float32 and bfloat16 input; float16's range is
  // safe) would overflow or underflow their float32 sums of squares: then every row of the warp
  // tile is scaled by up^-1 = 2^-e, 2^e the power of two at its largest |x| (exact products), and
  // its norm is nr * up. Row maxima as float32 bits: non-negative floats order as integers.
  constexpr bool WIDE = F32 || TC_BF;
  float up[ENC_MT][2];
#pragma unroll
  for (int m = 0; m < ENC_MT; ++m) up[m][0] = up[m][1] = 1.f;
  if constexpr (WIDE) {
    u32 mx[ENC_MT][2];
    bool wide = false;
#pragma unroll
    for (int m = 0; m < ENC_MT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        u32 b = 0;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            if constexpr (F32) {
              b = max(b, max(__float_as_uint(fv[m][h][ks][2 * q]) & 0x7fffffffu,
                             __float_as_uint(fv[m][h][ks][2 * q + 1]) & 0x7fffffffu));
            } else {
              const u32 w = ah[m][h][ks][q];
              b = max(b, max((w & 0x7fffu) << 16, (w >> 16 & 0x7fffu) << 16));
            }
          }
        b = max(b, __shfl_xor_sync(0xffffffffu, b, 1));
        b = max(b, __shfl_xor_sync(0xffffffffu, b, 2));
        mx[m][h] = b;
        wide |= b != 0u && (b < (77u << 23) || b >= (178u << 23));
      }
    if (__any_sync(0xffffffffu, wide)) {
#pragma unroll
      for (int m = 0; m < ENC_MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const u32 e = min(max(mx[m][h] >> 23, 1u), 253u);  // 2^-e stays a normal number
          const float down = __uint_as_float((254u - e) << 23);
          up[m][h] = __uint_as_float(e << 23);
          if constexpr (F32) {
            float a = 0.f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                const float v = fv[m][h][ks][k] * down;
                fv[m][h][ks][k] = v;
                a = fmaf(v, v, a);
              }
            ss[m][h] = a;
          } else {
            const u32 d2 = (__float_as_uint(down) >> 16) * 0x10001u;  // bfloat16 pair of `down`
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
#pragma unroll
              for (int q = 0; q < 2; ++q) ah[m][h][ks][q] = bf16x2_mul(ah[m][h][ks][q], d2);
          }
        }
    }
  }
  if constexpr (!F32) {
    // Squared norms as the diagonal of x x^T: B = the row's own A registers. Row r's entry lands in
    // lane 4r + r/2 (element r % 2 of the first product; of the second, rows r + 8 at 2 + r % 2).
#pragma unroll
    for (int m = 0; m < ENC_MT; ++m) {
      float d0[4] = {0.f, 0.f, 0.f, 0.f}, d1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        mma16816<TC_BF>(d0, ah[m][0][ks][0], ah[m][1][ks][0], ah[m][0][ks][1], ah[m][1][ks][1], ah[m][0][ks][0],
                        ah[m][0][ks][1]);
        mma16816<TC_BF>(d1, ah[m][0][ks][0], ah[m][1][ks][0], ah[m][0][ks][1], ah[m][1][ks][1], ah[m][1][ks][0],
                        ah[m][1][ks][1]);
      }
      const int src = 4 * r + (r >> 1);
      ss[m][0] = __shfl_sync(0xffffffffu, r & 1 ? d0[1] : d0[0], src);
      ss[m][1] = __shfl_sync(0xffffffffu, r & 1 ? d1[3] : d1[2], src);
    }
  }
  // Group norms (float32: the 4 lanes of a row hold its Q-position pieces), scale, 1/denominator,
  // norms out.
  float(&inv)[ENC_MT][2] = f.inv;
#pragma unroll
  for (int m = 0; m < ENC_MT; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float a = ss[m][h];
      if constexpr (F32) {
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        a += __shfl_xor_sync(0xffffffffu, a, 2);
      }
      // rsqrt (MUFU, <= 2 ulp): no division or square-root slow paths in the loop.
      const float rs = rsqrtf(a), nr = a > 0.f ? a * rs : 0.f;
      // float32: sc = 2^-e with 2^e the power of two at or below the norm (16-bit inputs go in as
      // stored: 1); inv = 1 / (nr * sc * 2^TC_RS_EXP) by exact power-of-two products.
      const u32 eb = __float_as_uint(nr) & 0x7f800000u;
      const float sc = F32 ? __uint_as_float((254u << 23) - eb) : 1.f;
      const float p2 = F32 ? __uint_as_float(eb) * (1.f / (1 << TC_RS_EXP)) : 1.f / (1 << TC_RS_EXP);
      inv[m][h] = a > 0.f ? rs * p2 : 1.f;
      if (t == 0) *reinterpret_cast<u16*>(stg + (16 * m + 8 * h + r) * R + CC::gnorm(g)) = f2bf(nr * up[m][h]);
      if constexpr (F32) {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const float f0 = fv[m][h][ks][2 * q] * sc, f1 = fv[m][h][ks][2 * q + 1] * sc;
            const u32 hw = pack_h2(f0, f1);
            ah[m][h][ks][q] = hw;
            al[m][h][ks][q] = pack_h2(f0 - h2f(static_cast<u16>(hw & 0xffffu)), f1 - h2f(static_cast<u16>(hw >> 16)));
          }
      }
    }
  }
}

// Phase 2 of a group: rotation on the tensor cores (fragment table bt in shared memory), codes
// through the group's grid (this lane's bin: boundary bnd, count below cnt), code bytes into the
// record buffer stg.
template <int g>
__device__ __forceinline__ void tc_rotate(const TcFrag<g>& f, const uint4* bt, float bnd, u32 cnt, u8* stg,
                                          int lane) {
  constexpr int G = CC::gdim(g), KS = G / 16, Q = G / 4;
  constexpr int B = CC::gbits(g);
  using Grid = TcGrid<g>;
  constexpr int NW = (Q * B + 31) / 32, CB = Q * B / 8, R = CC::R;
  constexpr bool F32 = IN_KIND == TQ_F32;
  const int r = lane >> 2, t = lane & 3;
  const auto& ah = f.ah;
  const auto& al = f.al;
  const auto& inv = f.inv;
  float bscale[ENC_MT][2], ninv[ENC_MT][2];  // negated: a free operand of the comparison's FMA
#pragma unroll
  for (int m = 0; m < ENC_MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) bscale[m][h] = inv[m][h] * Grid::S, ninv[m][h] = -inv[m][h];
  u32 cw[ENC_MT][2][NW];
#pragma unroll
  for (int m = 0; m < ENC_MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int k = 0; k < NW; ++k) cw[m][h][k] = 0u;
  // Codes of m-tile m's accumulators acc[e] of n-tile nt (columns 2t, 2t+1 of rows r, r+8).
  auto quantize = [&](int m, int nt, const float* acc) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1, slot = 2 * nt + (e & 1), bit = slot * B, wi = bit >> 5, sh = bit & 31;
      // y = acc * inv. Its bin (clamped: also keeps non-finite input in the grid), the bin's
      // boundary and count from lane k; y > boundary as the sign of boundary - y, exact in one
      // fused step. The bin index may be off by one within ~2^-22 of a bin edge, where the grid
      // has no boundary: the code is exact either way.
      const int k = __viaddmin_s32_relu(__float_as_int(fmaf(acc[e], bscale[m][h], TC_ROUND_BIAS)),
                                        Grid::O - TC_ROUND_BITS, Grid::N - 1);  // max(min(a + b, c), 0)
      const float bk = __shfl_sync(0xffffffffu, bnd, k);
      const u32 below = Grid::I ? static_cast<u32>(k) : __shfl_sync(0xffffffffu, cnt, k);
      const u32 c = below + (__float_as_uint(fmaf(acc[e], ninv[m][h], bk)) >> 31);
      // Added, not or-ed, into the zeroed slot: one shift-and-add instruction.
      cw[m][h][wi] += c << sh;
      if (sh + B > 32) cw[m][h][wi + 1] += c >> (32 - sh);
    }
  };
#if TC_WGMMA
  // One warpgroup product per m-tile and chunk of N output columns; bt = this group's tables.
  constexpr int N = G < 64 ? G : 64, BLK = 32 * G;  // bytes of one (part, k-step) block
  const u64 desc = tc_wg_desc(static_cast<u32>(__cvta_generic_to_shared(bt)) + 16 * tc_gtab(g), TC_WG_LBO, TC_WG_SBO);
#pragma unroll
  for (int m = 0; m < ENC_MT; ++m) {
#pragma unroll
    for (int c = 0; c < G / N; ++c) {
      float d[N / 2];
      tc_wg_fence();
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        // Descriptors of the hi and lo parts' blocks: only the address field moves, by a constant,
        // and never carries (shared memory is under 256 KB): one add each.
        const u64 dhi = desc + (ks * BLK + c * (N / 8) * TC_WG_SBO) / 16, dlo = dhi + KS * BLK / 16;
        tc_wgmma<N>(d, ah[m][0][ks][0], ah[m][1][ks][0], ah[m][0][ks][1], ah[m][1][ks][1], dhi, ks > 0);
        tc_wgmma<N>(d, ah[m][0][ks][0], ah[m][1][ks][0], ah[m][0][ks][1], ah[m][1][ks][1], dlo, 1);
        if constexpr (F32)
          tc_wgmma<N>(d, al[m][0][ks][0], al[m][1][ks][0], al[m][0][ks][1], al[m][1][ks][1], dhi, 1);
      }
      tc_wg_wait();
#pragma unroll
      for (int j = 0; j < N / 8; ++j) quantize(m, c * (N / 8) + j, d + 4 * j);
    }
  }
#else
  bt += tc_gtab(g) + lane;
#pragma unroll
  for (int nt = 0; nt < G / 8; ++nt) {
    float acc[ENC_MT][4];
#pragma unroll
    for (int m = 0; m < ENC_MT; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const uint4 b = bt[(nt * KS + ks) * 32];
#pragma unroll
      for (int m = 0; m < ENC_MT; ++m) {
        mma16816<TC_BF>(acc[m], ah[m][0][ks][0], ah[m][1][ks][0], ah[m][0][ks][1], ah[m][1][ks][1], b.x, b.y);
        mma16816<TC_BF>(acc[m], ah[m][0][ks][0], ah[m][1][ks][0], ah[m][0][ks][1], ah[m][1][ks][1], b.z, b.w);
        if constexpr (F32)
          mma16816(acc[m], al[m][0][ks][0], al[m][1][ks][0], al[m][0][ks][1], al[m][1][ks][1], b.x, b.y);
      }
    }
#pragma unroll
    for (int m = 0; m < ENC_MT; ++m) quantize(m, nt, acc[m]);
  }
#endif
  // Code pieces into the record buffer: CB bytes at gcode + t * CB of each row.
  constexpr int AL = (CC::gcode(g) % 4 == 0 && CB % 4 == 0) ? 4 : (CC::gcode(g) % 2 == 0 && CB % 2 == 0) ? 2 : 1;
#pragma unroll
  for (int m = 0; m < ENC_MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      tc_store_bytes<CB, AL>(stg + (16 * m + 8 * h + r) * R + CC::gcode(g) + t * CB, cw[m][h]);
}

// The tensor-core encode's loop over warp tiles, for any input and output addressing: Io gives
// row(s, v) (16-byte aligned address of vector v of stream s, channel order as stored), ch(s) (the
// stream's channel list or null) and store(s, v0, nv, stg, lane) (a tile's nv assembled records,
// R bytes each at stg, out). tcb: this block's fragment tables and grid words.
template <class Io>
__device__ __forceinline__ void tc_encode_tiles(const Io& io, int n, int streams, const uint4* __restrict__ tcb) {
  constexpr int R = CC::R, CH = TC_ROWB / 16;
  constexpr int TABBYTES = 16 * tc_gtab(CC::NG);
  extern __shared__ __align__(16) u8 tc_smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Each lane's bin of both grids: boundary, count below.
  const u32* gw = reinterpret_cast<const u32*>(tcb + tc_gtab(CC::NG)) + lane;
  const float bnd0 = __uint_as_float(__ldg(gw)), bnd1 = __uint_as_float(__ldg(gw + (CC::NG - 1) * 64));
  const u32 cnt0 = __ldg(gw + 32), cnt1 = __ldg(gw + (CC::NG - 1) * 64 + 32);
  const uint4* tab = reinterpret_cast<const uint4*>(tc_smem);
  u8* wbase = tc_smem + TABBYTES + warp * (TC_XBYTES + TC_CBYTES + TC_NV * R);
  u8* xs = wbase;
  u16* cbuf = reinterpret_cast<u16*>(wbase + TC_XBYTES);
  u8* stg = wbase + TC_XBYTES + TC_CBYTES;
  const int T = (n + TC_NV - 1) / TC_NV, total = streams * T, step = gridDim.x * ENC_WARPS;
  struct Tile {
    int s, v0, nv;  // stream, first vector, vectors
  };
  auto locate = [&](int tl) {
    const int s = tl / T, v0 = (tl - s * T) * TC_NV;
    return Tile{s, v0, min(TC_NV, n - v0)};
  };
  // Staging: lane l copies chunk l % CH of rows l / CH + RPI i; rows past the tile's end are
  // zero-filled (read from its first row, which exists, with size 0).
  constexpr int RPI = 32 / CH;
  static_assert(32 % CH == 0, "a staged row is 16 to 512 bytes");
  const int cl = lane % CH, vl = lane / CH;
  auto issue = [&](const Tile& tt) {
    const u8* src0 = io.row(tt.s, tt.v0) + cl * 16;
    auto rows = [&](auto full) {
#pragma unroll
      for (int i = 0; i < TC_NV / RPI; ++i) {
        const int v = RPI * i + vl;
        const bool ok = decltype(full)::value || v < tt.nv;
        cp_async16(xs + v * TC_ROWB + ((cl ^ (v % TC_SW)) << 4), ok ? io.row(tt.s, tt.v0 + v) + cl * 16 : src0,
                   ok ? 16 : 0);
      }
    };
    if (tt.nv == TC_NV)
      rows(Int<1>{});
    else
      rows(Int<0>{});
    const u16* chans = io.ch(tt.s);
    if (chans && lane < TC_CBYTES / 16) cp_async16(cbuf + lane * 8, chans + lane * 8, 16);
    cp_async_commit();
  };
  // Tiles go round the blocks first (warp w of block b starts at tile w * blocks + b), so the last,
  // partial round spreads over every SM instead of filling some and leaving the rest idle.
  int tile = warp * gridDim.x + blockIdx.x;
  // With wgmma the 4 warps of a warpgroup run every iteration together (the product is theirs in
  // common); a warp past the last tile computes on stale registers and stores nothing.
  const int lead = TC_WGMMA ? tile - (warp & 3) * gridDim.x : tile;
  if (tile < total) issue(locate(tile));
  // Block-wide: the fragment tables, laid out on the host as they are read
  // (cupy_raw_tc.fragment_table), copied while the first tiles load.
  for (int k = threadIdx.x; k < TABBYTES / 16; k += 32 * ENC_WARPS) cp_async16(tc_smem + 16 * k, tcb + k, 16);
  cp_async_commit();
  // Padding bytes are never written below: zero once.
  for (int k = lane; k < TC_NV * R / 4; k += 32) reinterpret_cast<u32*>(stg)[k] = 0u;
  cp_async_wait<0>();
#if TC_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to the tensor cores
#endif
  __syncthreads();
  // Zeroed once: a warpgroup's warp with no tile left still takes part in its products.
  TcFrag<0> f0{};
  TcFrag<CC::NG - 1> f1{};  // unused with one group
  for (int it = 0; lead + it * step < total; ++it, tile += step) {
    const bool mine = tile < total;
    cp_async_wait<0>();
    __syncwarp();
    const Tile cur = locate(tile);
    const u16* ch = mine && io.ch(cur.s) ? cbuf : nullptr;
    // Every group's values into registers first, so the staging buffer takes the next tile while
    // the tensor cores and the code lookups work.
    if (mine) {
      tc_gather<0>(xs, ch, stg, lane, f0);
      static_for<1, CC::NG>([&](auto gi) { tc_gather<decltype(gi)::value>(xs, ch, stg, lane, f1); });
    }
    __syncwarp();
    if (tile + step < total) issue(locate(tile + step));
    tc_rotate<0>(f0, tab, bnd0, cnt0, stg, lane);
    static_for<1, CC::NG>([&](auto gi) { tc_rotate<decltype(gi)::value>(f1, tab, bnd1, cnt1, stg, lane); });
    __syncwarp();
    if (mine) io.store(cur.s, cur.v0, cur.nv, stg, lane);
    __syncwarp();
  }
}

// tq_encode_tc's addressing: x [streams, n, D] and records [streams, n, R], C-contiguous.
struct TcContiguous {
  const u8* x;
  const u16* chans;
  u8* rec;
  int n;
  __device__ const u8* row(int s, int v) const { return x + (static_cast<u64>(s) * n + v) * TC_ROWB; }
  __device__ const u16* ch(int s) const { return chans ? chans + static_cast<u64>(s) * CC::D : nullptr; }
  __device__ void store(int s, int v0, int nv, const u8* stg, int lane) const {
    u8* dst = rec + (static_cast<u64>(s) * n + v0) * CC::R;
    const int nb = nv * CC::R;
    if (((reinterpret_cast<u64>(dst) | nb) & 15) == 0) {
      for (int k = lane; k < nb / 16; k += 32) reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(stg)[k];
    } else {
      for (int k = lane; k < nb / 4; k += 32) reinterpret_cast<u32*>(dst)[k] = reinterpret_cast<const u32*>(stg)[k];
    }
  }
};

extern "C" __global__ void __launch_bounds__(32 * ENC_WARPS, 1)
    tq_encode_tc(const void* __restrict__ x, const u16* __restrict__ chans, int n, int streams,
                 const uint4* __restrict__ tcb, u8* __restrict__ rec) {
  tc_encode_tiles(TcContiguous{static_cast<const u8*>(x), chans, rec, n}, n, streams, tcb);
}

// ------------------------------------------------------------------------------------ paged write
// tq_write_tc: tq_encode_tc's encode of new tokens straight into a paged cache, one launch per
// codec structure: grid (blocks, sets), set 0 = K, set 1 = V (sets = 1: the set given alone, when K
// and V build different modules). Stream s of a set is KV head s; vector v is new token v, read in
// place from x [T, H, D] (byte strides x_st, x_sh, rows 16-byte aligned) and written, where
// slots[v] lies in the cache (0 <= slot < num_blocks * bs), as its record at cache + b * c_sb + o *
// c_ss + s * c_sh (b, o = slot / bs, slot % bs; byte strides) and, where raw_slot[b] names a row
// of the raw pool (0 <= row < num_raw), as its RAW_KIND copy at element row * r_s0 + o * r_s1 + s *
// r_s2 of raw. wide: records and cache addresses 4-byte aligned (32-bit stores).
#ifndef RAW_KIND
#define RAW_KIND IN_KIND
#endif
#ifndef TC_RAW_U
#define TC_RAW_U 4  // 16-byte chunks of raw rows each lane has in flight
#endif
struct TcPaged {
  const u8* x;
  long long x_st, x_sh;
  const u16* chans;
  u8* cache;
  long long c_sb, c_ss, c_sh;
  void* raw;
  long long r_s0, r_s1, r_s2;
  const void* slots;
  int slot64, num_blocks, bs;
  const int* raw_slot;
  int num_raw, wide;
  __device__ const u8* row(int s, int v) const { return x + v * x_st + s * x_sh; }
  __device__ const u16* ch(int s) const { return chans ? chans + static_cast<u64>(s) * CC::D : nullptr; }
  __device__ long long slot(int v) const {
    return slot64 ? static_cast<const long long*>(slots)[v] : static_cast<const int*>(slots)[v];
  }
  __device__ void store(int s, int v0, int nv, const u8* stg, int lane) const {
    constexpr int R = CC::R, EPC = 16 / TC_ES, CPR = CC::D / EPC;
    // Lane i: row i's record offset in the cache and raw-pool element offset (-1: none), worked
    // out once per row, all rows' lookups in flight at once.
    long long ro = -1, xo = -1;
    if (lane < nv) {
      const long long sl = slot(v0 + lane);
      if (sl >= 0 && sl < static_cast<long long>(num_blocks) * bs) {
        const int b = static_cast<int>(sl / bs), o = static_cast<int>(sl - static_cast<long long>(b) * bs);
        ro = b * c_sb + o * c_ss + s * c_sh;
        const int rr = raw_slot ? raw_slot[b] : -1;
        if (rr >= 0 && rr < num_raw) xo = rr * r_s0 + o * r_s1 + s * r_s2;
      }
    }
    // Records: unit w of row i at lane k = i * PER + w, every row at once.
    auto records = [&](auto unit) {
      using U = decltype(unit);
      constexpr int PER = R / static_cast<int>(sizeof(U));
      for (int k0 = 0; k0 < nv * PER; k0 += 32) {
        const int k = k0 + lane, i = min(k / PER, 31), w = k - i * PER;
        const long long d = __shfl_sync(0xffffffffu, ro, i);
        if (k < nv * PER && d >= 0) reinterpret_cast<U*>(cache + d)[w] = reinterpret_cast<const U*>(stg + i * R)[w];
      }
    };
    if (wide)
      records(u32{});
    else
      records(u8{});
    // Raw rows: 16-byte chunks of the tokens' rows (in place), TC_RAW_U per lane loaded before any
    // is stored (a store in between would hold the next load back).
    if (!__any_sync(0xffffffffu, xo >= 0)) return;
    for (int k0 = 0; k0 < nv * CPR; k0 += 32 * TC_RAW_U) {
      float f[TC_RAW_U][EPC];
      long long e0[TC_RAW_U];
#pragma unroll
      for (int u = 0; u < TC_RAW_U; ++u) {
        const int k = k0 + 32 * u + lane, i = min(k / CPR, 31), c = k - i * CPR;
        const long long x = __shfl_sync(0xffffffffu, xo, i);
        e0[u] = k < nv * CPR && x >= 0 ? x + c * EPC : -1;
        if (e0[u] >= 0) load_vec<IN_KIND, EPC>(row(s, v0 + i), static_cast<u64>(c) * EPC, f[u]);
      }
#pragma unroll
      for (int u = 0; u < TC_RAW_U; ++u)
        if (e0[u] >= 0) {
#pragma unroll
          for (int e = 0; e < EPC; ++e) store_float<RAW_KIND>(raw, static_cast<u64>(e0[u]) + e, f[u][e]);
        }
    }
  }
};

// One set's arguments (K or V) of tq_write_tc.
#define TQ_WRITE_SET(I)                                                                                      \
  const void *x##I, long long x_st##I, long long x_sh##I, const u16 *ch##I, u8 *cache##I, long long c_sb##I,  \
      long long c_ss##I, long long c_sh##I, void *raw##I, long long r_s0##I, long long r_s1##I,              \
      long long r_s2##I, const uint4 *tcb##I

extern "C" __global__ void __launch_bounds__(32 * ENC_WARPS, 1)
    tq_write_tc(int n, int h_kv, const void* __restrict__ slots, int slot64, int num_blocks, int bs,
                const int* __restrict__ raw_slot, int num_raw, int wide, TQ_WRITE_SET(0), TQ_WRITE_SET(1)) {
  const bool v = blockIdx.y == 1;
  const TcPaged io{static_cast<const u8*>(v ? x1 : x0), v ? x_st1 : x_st0, v ? x_sh1 : x_sh0, v ? ch1 : ch0,
                   v ? cache1 : cache0, v ? c_sb1 : c_sb0, v ? c_ss1 : c_ss0, v ? c_sh1 : c_sh0,
                   v ? raw1 : raw0, v ? r_s01 : r_s00, v ? r_s11 : r_s10, v ? r_s21 : r_s20,
                   slots, slot64, num_blocks, bs, raw_slot, num_raw, wide};
  tc_encode_tiles(io, n, h_kv, v ? tcb1 : tcb0);
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
    if (tid == 0) scl[f] = rec_norm(r, Cd::fscale(f)) * Cd::ffactor(f);
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
      const int ch = chans ? min(static_cast<int>(chans[static_cast<u64>(s) * D + G0 + i]), D - 1) : G0 + i;
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
    const int ch = chans ? min(static_cast<int>(chans[static_cast<u64>(s) * D + i]), D - 1) : i;
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
