// Fused decode attention over TurboQuant-compressed K/V (flash-decoding: split over the sequence).
//
// Kernels (launched in this order by cupy_raw.attention, all on one stream, no host sync):
//   tq_attn_prep    grid (B*h_q), block 128: q -> float32 copy, permute by the key channels, rotate
//                   per group (and project by S for prod keys), fold scale*log2(e), store as
//                   float16 hi+lo pairs with a per-head power-of-two range factor.
//   tq_attn_split   grid (ceil(P/NWARPS), B*h_kv), NWARPS warps: warp p of a KV stream owns a
//                   contiguous run of 16-token tiles, streams K and V records through a per-warp
//                   cp.async ring, computes scores with m16n8k16 tensor-core products (tokens x
//                   dims against dims x query heads: all GQ query heads of the group share each
//                   K read), keeps an online softmax per head, and accumulates V in the rotated
//                   domain with a second product (dims x tokens against tokens x heads).
//                   Writes per-warp partials: max m, sum l (log2 domain) and acc (G, V fdims).
//   tq_attn_reduce  grid (B*h_q), block 128: merges the P partials, adds the uncompressed tail
//                   tokens to the same softmax, applies S^T to the QJL accumulators (prod values),
//                   un-rotates once per query, scatters through the value channels.
//
// Fragment layout (PTX m16n8k16, lane = 4*gid + t). Score product, per K field of dim G:
//   A = decoded codes (16 tokens x 16 dims): lane holds tokens gid, gid+8; logical k 2t,2t+1 and
//   2t+8,2t+9 of k-step j map to physical dims t*G/4 + 4j + {0,1} and {2,3}, so each lane decodes
//   one contiguous quarter of the field's code stream; the query B fragment uses the same map.
//   Value product, per V field: A = decoded codes transposed (16 dims x 16 tokens): rows gid, gid+8
//   of m-tile i are dims gid*G/8 + 2i and +1, so each lane decodes one contiguous eighth.
// Code values come from per-lane replicated PAIR tables in shared memory (entry e of lane L at word
// 32*e + L, so lookups never conflict on banks): entry e0 | e1 << bits holds the float16 values of
// codes e0 (bits 0-15) and e1 (bits 16-31), one lookup per mma register. Code tables hold
// s * centroid with s in [1, 2) chosen on the host to minimise float16 rounding (max relative error
// ~1e-4 at 4 bits, ~2e-5 at 3 bits; plain float16 centroids put outputs ~2.5x outside float32
// parity, measured by NumPy emulation); 1/s joins the per-token norm. Products then run as
// c*q_hi + c*q_lo for scores (the query needs its lo half) and c*P for values (P, in [0, 1] times a
// norm, stays float16). K and V share one table copy when their codebooks coincide (KV_SAME_LUT).
#include "tq_common.cuh"

TQ_CODEC(KC, K)
TQ_CODEC(VC, V)

#ifndef NWARPS
#define NWARPS 4  // warps per block; each is independent (own tiles, own partial)
#endif
#ifndef MINBLOCKS
#define MINBLOCKS 1  // resident blocks per SM the register allocation must allow
#endif
#ifndef STAGES
#define STAGES 4  // cp.async ring depth per warp: ~4 KB in flight per warp hides DRAM latency
#endif
#define NT ((GQ + 7) / 8)  // n-tiles of 8 query heads
#define TILE 16            // tokens per tile (the mma M / K extent)
#define TILE_BYTES_K (TILE * K_R + 32)  // + 16 B misalignment slack + 16 B over-read padding
#define TILE_BYTES_V (TILE * V_R + 32)
#define STAGE_BYTES (((TILE_BYTES_K + TILE_BYTES_V) + 15) / 16 * 16)
#define PSTRIDE 24  // halves per row of the transposed P buffer (16 used; 48 B spreads banks)

constexpr float LOG2E = 1.4426950408889634f;

// ------------------------------------------------------------------------------------ prep
extern "C" __global__ void tq_attn_prep(const void* __restrict__ q, const u16* __restrict__ kch,
                                        const float* __restrict__ ktab, float scale,
                                        float* __restrict__ q32, u16* __restrict__ qh,
                                        float* __restrict__ qscale) {
  constexpr int D = KC::D, QD = KC::fdims();
  __shared__ float qo[D], qp[D], qf[QD];
  __shared__ float red[32];
  const int row = blockIdx.x;           // b*h_q + head
  const int stream = row / GQ;          // b*h_kv + head/GQ
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = load_float<IN_KIND>(q, static_cast<u64>(row) * D + i);
    qo[i] = v;
    q32[static_cast<u64>(row) * D + i] = v;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    qp[i] = kch ? qo[kch[static_cast<u64>(stream) * D + i]] : qo[i];
  __syncthreads();
  rotate_fields<KC>(ktab, qp, qf);
  // Range factor: a power of two that brings max|q * scale * log2 e| into [0.5, 1), so the float16
  // hi/lo split neither overflows nor loses precision, whatever the query's magnitude.
  float amax = 0.f;
  for (int i = threadIdx.x; i < QD; i += blockDim.x) amax = fmaxf(amax, fabsf(qf[i] * scale * LOG2E));
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) amax = fmaxf(amax, red[w]);
  int ex = 0;
  if (amax > 0.f) frexpf(amax, &ex);
  const float e = ldexpf(1.f, -ex), inv = ldexpf(1.f, ex);
  for (int i = threadIdx.x; i < QD; i += blockDim.x) {
    const float v = qf[i] * scale * LOG2E * e;
    const u16 hi = f2h(v);
    qh[(static_cast<u64>(row) * 2) * QD + i] = hi;
    qh[(static_cast<u64>(row) * 2 + 1) * QD + i] = f2h(v - h2f(hi));
  }
  if (threadIdx.x == 0) qscale[row] = inv;
}

// ------------------------------------------------------------------------------------ split
extern "C" __global__ void __launch_bounds__(NWARPS * 32, MINBLOCKS)
    tq_attn_split(const u8* __restrict__ krec, const u8* __restrict__ vrec,
                  const u16* __restrict__ qh, const float* __restrict__ qscale,
                  const u32* __restrict__ klutv, const u32* __restrict__ vlutv,
                  float* __restrict__ part_m, float* __restrict__ part_l,
                  float* __restrict__ part_acc, int n, int tiles_per_warp, int nparts) {
  constexpr int KQD = KC::fdims(), VQD = VC::fdims(), KNF = KC::nf(), VNF = VC::nf();
  extern __shared__ __align__(16) u8 smem[];
  u32* klut = reinterpret_cast<u32*>(smem);
#if KV_SAME_LUT
  u32* vlut = klut;
  u16* pbuf_all = reinterpret_cast<u16*>(klut + 32 * KC::lutn());
#else
  u32* vlut = klut + 32 * KC::lutn();
  u16* pbuf_all = reinterpret_cast<u16*>(vlut + 32 * VC::lutn());
#endif
  u8* ring_all = reinterpret_cast<u8*>(pbuf_all) + ((NWARPS * VNF * NT * 8 * PSTRIDE * 2 + 15) / 16 * 16);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, t = lane & 3;
  for (int i = threadIdx.x; i < 32 * KC::lutn(); i += blockDim.x) klut[i] = klutv[i >> 5];
#if !KV_SAME_LUT
  for (int i = threadIdx.x; i < 32 * VC::lutn(); i += blockDim.x) vlut[i] = vlutv[i >> 5];
#else
  (void)vlutv;
#endif
  __syncthreads();

  const int bh = blockIdx.y;
  const int p = blockIdx.x * NWARPS + warp;
  if (p >= nparts) return;
  const int ntiles = (n + TILE - 1) / TILE;
  const int tile0 = p * tiles_per_warp;
  const int my_tiles = max(0, min(tiles_per_warp, ntiles - tile0));
  u16* pbuf = pbuf_all + warp * (VNF * NT * 8 * PSTRIDE);
  u8* ring = ring_all + warp * (STAGES * STAGE_BYTES);

  // Query fragments (hi, lo) for every K field and k-step, in registers for the whole run.
  constexpr int KSTEPS = KQD / 16;
  u32 qf[KSTEPS][NT][4];
  float qsc[NT][2];
  static_for<0, KNF>([&](auto fi) {
    constexpr int f = decltype(fi)::value, G = KC::fdim(f), S0 = KC::foff(f) / 16;
#pragma unroll
    for (int j = 0; j < G / 16; ++j)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int h = nt * 8 + gid;
        const int dim = KC::foff(f) + t * (G / 4) + 4 * j;
        const u16* base = qh + (static_cast<u64>(bh) * GQ + h) * 2 * KQD;
        const bool ok = h < GQ;
        qf[S0 + j][nt][0] = ok ? *reinterpret_cast<const u32*>(base + dim) : 0u;
        qf[S0 + j][nt][1] = ok ? *reinterpret_cast<const u32*>(base + dim + 2) : 0u;
        qf[S0 + j][nt][2] = ok ? *reinterpret_cast<const u32*>(base + KQD + dim) : 0u;
        qf[S0 + j][nt][3] = ok ? *reinterpret_cast<const u32*>(base + KQD + dim + 2) : 0u;
      }
  });
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = nt * 8 + 2 * t + e;
      qsc[nt][e] = h < GQ ? qscale[static_cast<u64>(bh) * GQ + h] : 0.f;
    }

  constexpr int VTILES = VQD / 16;  // m-tiles over all V fields
  float acc[VTILES][NT][4];
#pragma unroll
  for (int i = 0; i < VTILES; ++i)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][nt][c] = 0.f;
  float m_run[NT][2], l_run[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      m_run[nt][e] = -TQ_INF;
      l_run[nt][e] = 0.f;
    }

  const u64 row_bytes_k = static_cast<u64>(n) * K_R, row_bytes_v = static_cast<u64>(n) * V_R;
  const u8* kbase = krec + static_cast<u64>(bh) * row_bytes_k;
  const u8* vbase = vrec + static_cast<u64>(bh) * row_bytes_v;
  // Records of a tile start at byte (tile*16*R) of the stream; the copy starts at the 16-byte
  // boundary below, so the tile sits at offset `mis` (a multiple of 4) in the stage buffer.
  auto issue = [&](int it) {
    u8* st = ring + (it % STAGES) * STAGE_BYTES;
    const u64 tok0 = static_cast<u64>(tile0 + it) * TILE;
    {
      const u8* s = kbase + tok0 * K_R;
      const u8* a = reinterpret_cast<const u8*>(reinterpret_cast<u64>(s) & ~15ull);
      const long long end = static_cast<long long>(kbase + row_bytes_k - a);
      const long long full = static_cast<long long>(s - a) + TILE * K_R;
      const long long stop = min(end, full);
      // Whole tile copied, past-the-end tokens zero-filled (no read; source clamped in bounds):
      // stale shared memory could hold NaN norms, and 0 * NaN would poison the sums.
      for (int c = lane; c * 16 < full; c += 32) {
        const int nb = static_cast<int>(max(0ll, min(16ll, stop - c * 16)));
        cp_async16(st + c * 16, nb ? a + c * 16 : a, nb);
      }
    }
    {
      const u8* s = vbase + tok0 * V_R;
      const u8* a = reinterpret_cast<const u8*>(reinterpret_cast<u64>(s) & ~15ull);
      const long long end = static_cast<long long>(vbase + row_bytes_v - a);
      const long long full = static_cast<long long>(s - a) + TILE * V_R;
      const long long stop = min(end, full);
      for (int c = lane; c * 16 < full; c += 32) {
        const int nb = static_cast<int>(max(0ll, min(16ll, stop - c * 16)));
        cp_async16(st + TILE_BYTES_K + c * 16, nb ? a + c * 16 : a, nb);
      }
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < my_tiles) issue(s);
    cp_async_commit();
  }

  for (int it = 0; it < my_tiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();
    const u8* st = ring + (it % STAGES) * STAGE_BYTES;
    const u64 tok0 = static_cast<u64>(tile0 + it) * TILE;
    const u8* kt = st + (reinterpret_cast<u64>(kbase + tok0 * K_R) & 15);
    const u8* vt = st + TILE_BYTES_K + (reinterpret_cast<u64>(vbase + tok0 * V_R) & 15);

    // ---- scores: s[nt][c] for tokens (gid, gid+8) x heads (nt*8 + 2t + {0,1})
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = 0.f;
    static_for<0, KNF>([&](auto fi) {
      constexpr int f = decltype(fi)::value, G = KC::fdim(f), B = KC::fbits(f);
      constexpr int SEGB = (G / 4) * B, NWD = (SEGB + 31) / 32, S0 = KC::foff(f) / 16;
      const u32* lut = klut + 32 * KC::flut(f) + lane;
      u32 w0[NWD], w1[NWD];
      load_stream<NWD>(kt + gid * K_R, KC::fbitoff(f) + t * SEGB, w0);
      load_stream<NWD>(kt + (gid + 8) * K_R, KC::fbitoff(f) + t * SEGB, w1);
      // Four independent accumulators per n-tile (k-step parity x query hi/lo): no serial mma chain.
      float c[4][NT][4];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int k = 0; k < 4; ++k) c[a][nt][k] = 0.f;
      static_for<0, G / 16>([&](auto ji) {
        constexpr int j = decltype(ji)::value;
        // One pair-table lookup per register: codes 4j,4j+1 (and 4j+2,4j+3) are adjacent bits.
        const u32 a0 = lut[32 * bits_at<(4 * j) * B, 2 * B>(w0)];
        const u32 a1 = lut[32 * bits_at<(4 * j) * B, 2 * B>(w1)];
        const u32 a2 = lut[32 * bits_at<(4 * j + 2) * B, 2 * B>(w0)];
        const u32 a3 = lut[32 * bits_at<(4 * j + 2) * B, 2 * B>(w1)];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma16816(c[(j & 1) * 2][nt], a0, a1, a2, a3, qf[S0 + j][nt][0], qf[S0 + j][nt][1]);
          mma16816(c[(j & 1) * 2 + 1][nt], a0, a1, a2, a3, qf[S0 + j][nt][2], qf[S0 + j][nt][3]);
        }
      });
      const float sc0 = rec_half(kt + gid * K_R, KC::fscale(f)) * KC::pfactor(f);
      const float sc1 = rec_half(kt + (gid + 8) * K_R, KC::fscale(f)) * KC::pfactor(f);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float cs[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) cs[k] = (c[0][nt][k] + c[2][nt][k]) + (c[1][nt][k] + c[3][nt][k]);
        s[nt][0] = fmaf(sc0, cs[0], s[nt][0]);
        s[nt][1] = fmaf(sc0, cs[1], s[nt][1]);
        s[nt][2] = fmaf(sc1, cs[2], s[nt][2]);
        s[nt][3] = fmaf(sc1, cs[3], s[nt][3]);
      }
    });

    // ---- online softmax (log2 domain); p[nt][e][r]: head 2t+e, token gid + 8r
    const bool valid0 = tok0 + gid < static_cast<u64>(n), valid1 = tok0 + gid + 8 < static_cast<u64>(n);
    float pr[NT][2][2], al[NT][2];
    bool grew = false;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float x0 = valid0 ? s[nt][e] * qsc[nt][e] : -TQ_INF;
        const float x1 = valid1 ? s[nt][2 + e] * qsc[nt][e] : -TQ_INF;
        float mx = fmaxf(x0, x1);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float mnew = fmaxf(m_run[nt][e], mx);
        const float msafe = mnew == -TQ_INF ? 0.f : mnew;
        const float alpha = exp2f(m_run[nt][e] - msafe);
        pr[nt][e][0] = exp2f(x0 - msafe);
        pr[nt][e][1] = exp2f(x1 - msafe);
        l_run[nt][e] = l_run[nt][e] * alpha + pr[nt][e][0] + pr[nt][e][1];
        m_run[nt][e] = mnew;
        al[nt][e] = alpha;
        grew |= alpha != 1.f;
      }
    // Lazy rescale: once the running maxima settle, most tiles leave every alpha at exactly 1.
    if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int i = 0; i < VTILES; ++i) {
            acc[i][nt][e] *= al[nt][e];
            acc[i][nt][2 + e] *= al[nt][e];
          }
    }

    // ---- P' = p * per-token value scale, transposed through shared memory: pbuf[f][head][token]
    static_for<0, VNF>([&](auto fi) {
      constexpr int f = decltype(fi)::value;
      const float sc0 = rec_half(vt + gid * V_R, VC::fscale(f)) * VC::pfactor(f);
      const float sc1 = rec_half(vt + (gid + 8) * V_R, VC::fscale(f)) * VC::pfactor(f);
      u16* pb = pbuf + f * (NT * 8 * PSTRIDE);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          u16* r = pb + (nt * 8 + 2 * t + e) * PSTRIDE;
          r[gid] = f2h(valid0 ? pr[nt][e][0] * sc0 : 0.f);
          r[gid + 8] = f2h(valid1 ? pr[nt][e][1] * sc1 : 0.f);
        }
    });
    __syncwarp();

    // ---- values: acc[dims x heads] += codes^T[dims x tokens] * P'[tokens x heads]
    static_for<0, VNF>([&](auto fi) {
      constexpr int f = decltype(fi)::value, G = VC::fdim(f), B = VC::fbits(f);
      constexpr int SEGB = (G / 8) * B, NWD = (SEGB + 31) / 32, M0 = VC::foff(f) / 16;
      const u32* lut = vlut + 32 * VC::flut(f) + lane;
      u32 w[4][NWD];
      const int rows[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
      for (int r = 0; r < 4; ++r) load_stream<NWD>(vt + rows[r] * V_R, VC::fbitoff(f) + gid * SEGB, w[r]);
      const u16* pb = pbuf + f * (NT * 8 * PSTRIDE);
      u32 b[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        b[nt][0] = *reinterpret_cast<const u32*>(pb + (nt * 8 + gid) * PSTRIDE + 2 * t);
        b[nt][1] = *reinterpret_cast<const u32*>(pb + (nt * 8 + gid) * PSTRIDE + 2 * t + 8);
      }
      static_for<0, G / 16>([&](auto ii) {
        constexpr int i = decltype(ii)::value;
        // One pair-table lookup per register: the same dim of tokens (2t, 2t+1) or (2t+8, 2t+9).
        constexpr int P0 = (2 * i) * B, P1 = (2 * i + 1) * B;
        const u32 a0 = lut[32 * (bits_at<P0, B>(w[0]) | (bits_at<P0, B>(w[1]) << B))];
        const u32 a1 = lut[32 * (bits_at<P1, B>(w[0]) | (bits_at<P1, B>(w[1]) << B))];
        const u32 a2 = lut[32 * (bits_at<P0, B>(w[2]) | (bits_at<P0, B>(w[3]) << B))];
        const u32 a3 = lut[32 * (bits_at<P1, B>(w[2]) | (bits_at<P1, B>(w[3]) << B))];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816(acc[M0 + i][nt], a0, a1, a2, a3, b[nt][0], b[nt][1]);
      });
    });
    __syncwarp();
    if (it + STAGES - 1 < my_tiles) issue(it + STAGES - 1);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // ---- partials: rows (bh, p, head); acc element (m-tile i of field f, row gid[+8]) is value dim
  //      foff(f) + gid*G/8 + 2*(i - M0) [+1]
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float l = l_run[nt][e];
      l += __shfl_xor_sync(0xffffffffu, l, 4);
      l += __shfl_xor_sync(0xffffffffu, l, 8);
      l += __shfl_xor_sync(0xffffffffu, l, 16);
      const int h = nt * 8 + 2 * t + e;
      if (h < GQ) {
        const u64 prow = (static_cast<u64>(bh) * nparts + p) * GQ + h;
        if (gid == 0) {
          part_m[prow] = m_run[nt][e];
          part_l[prow] = l;
        }
        float* dst = part_acc + prow * VQD;
        static_for<0, VNF>([&](auto fi) {
          constexpr int f = decltype(fi)::value, G = VC::fdim(f), M0 = VC::foff(f) / 16;
#pragma unroll
          for (int i = 0; i < G / 16; ++i) {
            const int dim = VC::foff(f) + gid * (G / 8) + 2 * i;
            dst[dim] = acc[M0 + i][nt][e];
            dst[dim + 1] = acc[M0 + i][nt][2 + e];
          }
        });
      }
    }
}

// ------------------------------------------------------------------------------------ reduce
// Dynamic shared memory: w[nparts] | y[VQD] | z[D] | tail acc[D] | q[D] | logits[32].
extern "C" __global__ void tq_attn_reduce(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                          const float* __restrict__ part_acc, int nparts,
                                          const float* __restrict__ q32, const void* __restrict__ k_tail,
                                          const void* __restrict__ v_tail, int t_len, float scale,
                                          const float* __restrict__ vtab, const u16* __restrict__ vch,
                                          float* __restrict__ out) {
  constexpr int D = VC::D, VQD = VC::fdims();
  extern __shared__ __align__(16) float sm[];
  float* w = sm;
  float* y = w + nparts;
  float* z = y + VQD;
  float* ta = z + D;
  float* qo = ta + D;
  float* lg = qo + D;
  const int row = blockIdx.x, bh = row / GQ, h = row % GQ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;

  float M = -TQ_INF;
  for (int p = 0; p < nparts; ++p) M = fmaxf(M, part_m[(static_cast<u64>(bh) * nparts + p) * GQ + h]);
  const float Ms = M == -TQ_INF ? 0.f : M;
  float L = 0.f;
  for (int p = 0; p < nparts; ++p) {
    const u64 pr = (static_cast<u64>(bh) * nparts + p) * GQ + h;
    const float wp = exp2f(part_m[pr] - Ms);
    L += wp * part_l[pr];
    if (threadIdx.x == 0) w[p] = wp;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < VQD; j += blockDim.x) {
    float a = 0.f;
    for (int p = 0; p < nparts; ++p) a = fmaf(w[p], part_acc[((static_cast<u64>(bh) * nparts + p) * GQ + h) * VQD + j], a);
    y[j] = a;
  }
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    ta[i] = 0.f;
    qo[i] = q32[static_cast<u64>(row) * D + i];
  }
  __syncthreads();

  // Uncompressed tail tokens join the same softmax, 32 at a time (online rescaling).
  const float sl = scale * LOG2E;
  for (int c0 = 0; c0 < t_len; c0 += 32) {
    const int cn = min(32, t_len - c0);
    for (int k = warp; k < cn; k += nw) {
      const u64 base = (static_cast<u64>(bh) * t_len + c0 + k) * D;
      float a = 0.f;
      for (int i = lane; i < D; i += 32) a = fmaf(qo[i], load_float<TAIL_KIND>(k_tail, base + i), a);
      for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
      if (lane == 0) lg[k] = a * sl;
    }
    __syncthreads();
    float cm = -TQ_INF;
    for (int k = 0; k < cn; ++k) cm = fmaxf(cm, lg[k]);
    const float Mn = fmaxf(M, cm);
    const float alpha = exp2f((M == -TQ_INF ? Mn : M) - Mn) * (M == -TQ_INF ? 0.f : 1.f);
    L *= alpha;
    for (int k = 0; k < cn; ++k) L += exp2f(lg[k] - Mn);
    for (int j = threadIdx.x; j < VQD; j += blockDim.x) y[j] *= alpha;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      float a = ta[i] * alpha;
      for (int k = 0; k < cn; ++k)
        a = fmaf(exp2f(lg[k] - Mn), load_float<TAIL_KIND>(v_tail, (static_cast<u64>(bh) * t_len + c0 + k) * D + i), a);
      ta[i] = a;
    }
    M = Mn;
    __syncthreads();
  }

  // Rotated domain -> record channel order: z_g = y_code + S^T y_sign, x_g = rotation^T z_g.
  static_for<0, VC::NG>([&](auto gi) {
    constexpr int g = decltype(gi)::value, G = VC::gdim(g), fc = g * (1 + VC::QJL);
    for (int i = threadIdx.x; i < G; i += blockDim.x) {
      float a = y[VC::foff(fc) + i];
      if constexpr (VC::QJL) {
        const float* S = vtab + VC::gproj(g);
        for (int j = 0; j < G; ++j) a = fmaf(S[j * G + i], y[VC::foff(fc + 1) + j], a);
      }
      z[VC::gstart(g) + i] = a;
    }
  });
  __syncthreads();
  const float invL = 1.f / L;
  static_for<0, VC::NG>([&](auto gi) {
    constexpr int g = decltype(gi)::value, G = VC::gdim(g);
    const float* Rm = vtab + VC::grot(g);
    for (int i = threadIdx.x; i < G; i += blockDim.x) {
      float a = 0.f;
      for (int j = 0; j < G; ++j) a = fmaf(Rm[j * G + i], z[VC::gstart(g) + j], a);
      const int pos = VC::gstart(g) + i;
      const int ch = vch ? vch[static_cast<u64>(bh) * D + pos] : pos;
      out[static_cast<u64>(row) * D + ch] = (a + ta[ch]) * invL;
    }
  });
}
