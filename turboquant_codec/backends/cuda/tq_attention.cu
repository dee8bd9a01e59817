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
//                   domain with a second product (dims x tokens against tokens x heads). The
//                   block's warps then merge their softmax states in shared memory and write one
//                   partial per block: max m, sum l (log2 domain) and acc (G, V fdims).
//   tq_attn_reduce  grid (B*h_q), block 256: merges the P partials, adds the uncompressed tail
//                   tokens to the same softmax, applies S^T to the QJL accumulators (prod values),
//                   un-rotates once per query, scatters through the value channels.
//
// Fragment layout (PTX m16n8k16, lane = 4*gid + t). Score product, per K field of dim G:
//   A = decoded codes (16 tokens x 16 dims): lane holds tokens gid, gid+8; logical k 2t,2t+1 and
//   2t+8,2t+9 of k-step j map to physical dims t*G/4 + 4j + {0,1} and {2,3}, so each lane decodes
//   one contiguous quarter of the field's code stream; the query B fragment uses the same map.
//   Value product, per V field: A = decoded codes transposed (16 dims x 16 tokens): rows gid, gid+8
//   of m-tile i are dims gid*G/8 + 2i and +1, so each lane decodes one contiguous eighth.
//   P (scores' accumulator layout: tokens x heads) becomes the value product's B operand by one
//   8x8 register transpose (movmatrix) per row half: no shared-memory round trip.
// Code values come from per-lane replicated PAIR tables in shared memory (entry e of lane L at word
// 32*e + L, so lookups never conflict on banks): entry e0 | e1 << bits holds the float16 values of
// codes e0 (bits 0-15) and e1 (bits 16-31), one lookup per mma register; the index arrives
// pre-shifted to the entry stride (bits_scaled), so a lookup is shift, mask|lane, load. Code tables
// hold s * centroid with s = sqrt(g) / 2^k in [1, 2): codec centroids are float16 values over
// sqrt(g) (codebooks.codec_codebook), so every table value is exact in float16 and 1/s joins the
// per-token norm. Precision: scores run as c*q_hi + c*q_lo, values as c*P_hi + c*P_lo (query and
// P' = p * norm split into float16 hi + lo): float32-level products with one lookup per register
// (with peaked softmaxes a 1e-4 relative score error would move outputs by ~1e-3). K and V share
// one table when their codebooks coincide (KV_SAME_LUT).
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
// Up to 4 query heads per KV head: one n-tile's columns 0-3 carry the heads' hi halves and columns
// 4-7 their lo halves (query in the score product, P' in the value product), so a single mma
// does the work of two; partner columns h and h + 4 are summed across lanes t and t ^ 2.
#define PACK (GQ <= 4)
#define TILE 16            // tokens per tile (the mma M / K extent)
#define TILE_BYTES_K (TILE * K_R + 32)  // + 16 B misalignment slack + 16 B over-read padding
#define TILE_BYTES_V (TILE * V_R + 32)
#define STAGE_BYTES (((TILE_BYTES_K + TILE_BYTES_V) + 15) / 16 * 16)

constexpr float LOG2E = 1.4426950408889634f;

// 2^x for x <= 0 (softmax weights), results below 2^-126 flushed to zero: exp2f's denormal
// rescaling costs four extra instructions per call and changes nothing a float16 P' can hold.
__device__ __forceinline__ float fast_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// op over all threads of the block (blockDim.x a multiple of 32); every thread gets the result.
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float* red, Op op) {
  for (int o = 16; o; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // red may still be read by a previous reduction
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  v = red[0];
  for (int i = 1; i < static_cast<int>(blockDim.x >> 5); ++i) v = op(v, red[i]);
  return v;
}

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
  amax = block_reduce(amax, red, [](float a, float b) { return fmaxf(a, b); });
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
  // Tables: K pairs, then V pairs unless V shares K's. Lane L's copy of entry e is word 32e + L.
  // After the main loop the whole buffer is reused for the block's merge (cupy_raw._merge_smem).
  u32* klut = reinterpret_cast<u32*>(smem);
#if KV_SAME_LUT
  u32* vlut = klut;
  u8* ring_all = reinterpret_cast<u8*>(klut + 32 * KC::lutn());
#else
  u32* vlut = klut + 32 * KC::lutn();
  u8* ring_all = reinterpret_cast<u8*>(vlut + 32 * VC::lutn());
#endif

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, t = lane & 3;
  const u32 lane4 = static_cast<u32>(lane) << 2;  // byte offset of this lane's copy of an entry
  // Warp w fills entries w, w + NWARPS, ...: one broadcast load per entry and warp, unrolled so
  // that the loads of several entries are in flight at once (the tables come from L2).
#pragma unroll 4
  for (int e = warp; e < KC::lutn(); e += NWARPS) klut[32 * e + lane] = klutv[e];
#if !KV_SAME_LUT
#pragma unroll 4
  for (int e = warp; e < VC::lutn(); e += NWARPS) vlut[32 * e + lane] = vlutv[e];
#else
  (void)vlutv;
#endif
  __syncthreads();

  const int bh = blockIdx.y;
  // Warps past the last partial run no tiles but still join the block's merge.
  const int p = blockIdx.x * NWARPS + warp;
  const int ntiles = (n + TILE - 1) / TILE;
  const int tile0 = p * tiles_per_warp;
  const int my_tiles = p < nparts ? max(0, min(tiles_per_warp, ntiles - tile0)) : 0;
  u8* ring = ring_all + warp * (STAGES * STAGE_BYTES);

  // Query fragments for every K field and k-step, in registers for the whole run: (hi, lo) B
  // fragments, or with PACK one fragment whose column gid is head gid & 3, half gid >> 2.
  constexpr int KSTEPS = KQD / 16, QW = PACK ? 2 : 4;
  u32 qf[KSTEPS][NT][QW];
  float qsc[NT][2];
  static_for<0, KNF>([&](auto fi) {
    constexpr int f = decltype(fi)::value, G = KC::fdim(f), S0 = KC::foff(f) / 16;
#pragma unroll
    for (int j = 0; j < G / 16; ++j)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int h = PACK ? gid & 3 : nt * 8 + gid, half = PACK ? gid >> 2 : 0;
        const int dim = KC::foff(f) + t * (G / 4) + 4 * j;
        const u16* base = qh + ((static_cast<u64>(bh) * GQ + h) * 2 + half) * KQD;
        const bool ok = h < GQ;
#pragma unroll
        for (int w = 0; w < QW; ++w)  // (hi k, hi k+8[, lo k, lo k+8])
          qf[S0 + j][nt][w] = ok ? *reinterpret_cast<const u32*>(base + (w >> 1) * KQD + dim + 2 * (w & 1)) : 0u;
      }
  });
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = PACK ? (2 * t + e) & 3 : nt * 8 + 2 * t + e;
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

  // Records of tile T start at byte T * TILE * R of the stream. TILE * R is a multiple of 16, so
  // the 16-byte aligned copy window moves by exactly TILE * R per tile and every tile sits at the
  // stream's fixed misalignment `mis` (a multiple of 4) in its stage buffer. Each lane copies
  // chunks lane, lane + 32, ... of the window. Tiles below `safe` copy whole chunks with no bounds
  // arithmetic (the window's last chunk may run into the next tile's records, never past the
  // stream); later tiles clamp at the stream's end and zero-fill the rest.
  struct Stream {
    const u8* src;  // this lane's first chunk of the warp's first window
    long long end;  // bytes from the aligned stream start to the stream's end
    int mis;        // offset of the tile's first record in its window
    int safe;       // tiles [0, safe) of the stream copy with no clamping
  };
  auto stream_of = [&](const u8* rec, auto rec_bytes) {
    constexpr int R = decltype(rec_bytes)::value, CHUNKS = (TILE * R + 12 + 15) / 16;
    const u8* base = rec + static_cast<u64>(bh) * n * R;
    const int mis = static_cast<int>(reinterpret_cast<u64>(base) & 15);
    const long long end = static_cast<long long>(n) * R + mis;
    const int safe = end >= 16 * CHUNKS ? static_cast<int>((end - 16 * CHUNKS) / (TILE * R)) + 1 : 0;
    return Stream{base - mis + static_cast<long long>(tile0) * TILE * R + 16 * lane, end, mis, safe};
  };
  const Stream ks = stream_of(krec, Int<K_R>{}), vs = stream_of(vrec, Int<V_R>{});
  const u32 ring_lane = smem_addr(ring) + 16 * lane;
  auto copy_tile = [&](const Stream& sm, auto rec_bytes, int it, u32 dst) {
    constexpr int R = decltype(rec_bytes)::value, CHUNKS = (TILE * R + 12 + 15) / 16;
    const u8* src = sm.src + static_cast<long long>(it) * TILE * R;
    if (tile0 + it < sm.safe) {
#pragma unroll
      for (int k = 0; k < (CHUNKS + 31) / 32; ++k)
        if (lane + 32 * k < CHUNKS) cp_async16_full(dst + 512 * k, src + 512 * k);
    } else {
      // Past-the-end bytes are zero-filled (no read; source clamped in bounds): stale shared
      // memory could hold NaN norms, and 0 * NaN would poison the sums.
      const long long left = sm.end - static_cast<long long>(tile0 + it) * TILE * R - 16 * lane;
#pragma unroll
      for (int k = 0; k < (CHUNKS + 31) / 32; ++k)
        if (lane + 32 * k < CHUNKS) {
          const int nb = static_cast<int>(max(0ll, min(16ll, left - 512 * k)));
          cp_async16_shared(dst + 512 * k, nb ? src + 512 * k : sm.src - 16 * lane, nb);
        }
    }
  };
  auto issue = [&](int it) {
    const u32 st = ring_lane + (it % STAGES) * STAGE_BYTES;
    copy_tile(ks, Int<K_R>{}, it, st);
    copy_tile(vs, Int<V_R>{}, it, st + TILE_BYTES_K);
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
    const int left = n - (tile0 + it) * TILE;  // tokens of the stream from this tile on
    const u8* kt = st + ks.mis;
    const u8* vt = st + TILE_BYTES_K + vs.mis;

    // ---- scores: s[nt][c] for tokens (gid, gid+8) x heads (nt*8 + 2t + {0,1})
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = 0.f;
    static_for<0, KNF>([&](auto fi) {
      constexpr int f = decltype(fi)::value, G = KC::fdim(f), B = KC::fbits(f);
      constexpr int SEGB = (G / 4) * B, NWD = (SEGB + 31) / 32, S0 = KC::foff(f) / 16;
      const u32* lut = klut + 32 * KC::flut(f);
      u32 w0[NWD], w1[NWD];
      load_stream<NWD>(kt + gid * K_R, KC::fbitoff(f) + t * SEGB, w0);
      load_stream<NWD>(kt + (gid + 8) * K_R, KC::fbitoff(f) + t * SEGB, w1);
      // Independent accumulators per n-tile (k-step parity x query hi/lo): no serial mma chain.
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
        // Products c q_hi + c q_lo (one mma with PACK): float32-level scores.
        const u32 o0 = bits_scaled<(4 * j) * B, 2 * B, 7>(w0) | lane4;
        const u32 o1 = bits_scaled<(4 * j) * B, 2 * B, 7>(w1) | lane4;
        const u32 o2 = bits_scaled<(4 * j + 2) * B, 2 * B, 7>(w0) | lane4;
        const u32 o3 = bits_scaled<(4 * j + 2) * B, 2 * B, 7>(w1) | lane4;
        const u32 h0 = lds_at(lut, o0), h1 = lds_at(lut, o1), h2 = lds_at(lut, o2), h3 = lds_at(lut, o3);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma16816(c[(j & 1) * 2][nt], h0, h1, h2, h3, qf[S0 + j][nt][0], qf[S0 + j][nt][1]);
          if constexpr (!PACK)
            mma16816(c[(j & 1) * 2 + 1][nt], h0, h1, h2, h3, qf[S0 + j][nt][2], qf[S0 + j][nt][3]);
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
    if constexpr (PACK) {  // column h (q_hi) + column h + 4 (q_lo): both lanes get the full score
#pragma unroll
      for (int k = 0; k < 4; ++k) s[0][k] += __shfl_xor_sync(0xffffffffu, s[0][k], 2);
    }

    // ---- online softmax (log2 domain); p[nt][e][r]: head 2t+e, token gid + 8r
    const bool valid0 = gid < left, valid1 = gid + 8 < left;
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
        const float alpha = fast_exp2(m_run[nt][e] - msafe);
        pr[nt][e][0] = fast_exp2(x0 - msafe);
        pr[nt][e][1] = fast_exp2(x1 - msafe);
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

    // ---- values: acc[dims x heads] += codes^T[dims x tokens] * P'[tokens x heads], with
    //      P' = p * per-token value scale split into float16 hi + lo (float32-level products).
    static_for<0, VNF>([&](auto fi) {
      constexpr int f = decltype(fi)::value, G = VC::fdim(f), B = VC::fbits(f);
      constexpr int SEG = G / 8, NWD = (SEG * B + 31) / 32, M0 = VC::foff(f) / 16;
      const float sc[2] = {rec_half(vt + gid * V_R, VC::fscale(f)) * VC::pfactor(f),
                           rec_half(vt + (gid + 8) * V_R, VC::fscale(f)) * VC::pfactor(f)};
      const bool valid[2] = {valid0, valid1};
      // B operand (tokens x heads): the score fragment holds token rows (gid, gid+8) x columns
      // (2t, 2t+1); an 8x8 transpose per row half gives lane (column gid) x tokens (2t, 2t+1).
      // Without PACK, hi and lo halves are two operands; with PACK, lanes t >= 2 (columns 4-7)
      // hold the lo halves of the heads whose hi halves lanes t - 2 hold.
      u32 bhi[NT][2], blo[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float x0 = valid[r] ? pr[nt][0][r] * sc[r] : 0.f;
          const float x1 = valid[r] ? pr[nt][1][r] * sc[r] : 0.f;
          const u32 hi = pack_h2(x0, x1);
          const u32 lo = pack_h2(x0 - h2f(static_cast<u16>(hi)), x1 - h2f(static_cast<u16>(hi >> 16)));
          if constexpr (PACK) {
            bhi[nt][r] = transpose8x8(t >= 2 ? lo : hi);
          } else {
            bhi[nt][r] = transpose8x8(hi);
            blo[nt][r] = transpose8x8(lo);
          }
        }
      // Lane decodes one contiguous eighth of the field (dims gid*SEG ..) for tokens 2t, 2t+1,
      // 2t+8, 2t+9. pair_codes interleaves two tokens' codes of one dim into pair-table indices.
      const u32* lut = vlut + 32 * VC::flut(f);
      u32 w[4][NWD];
      const int rows[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
      for (int r = 0; r < 4; ++r) load_stream<NWD>(vt + rows[r] * V_R, VC::fbitoff(f) + gid * SEG * B, w[r]);
      constexpr int CH = (32 / B) & ~1;  // codes per interleaved chunk (even: whole dim pairs)
      static_for<0, (SEG + CH - 1) / CH>([&](auto ci) {
        constexpr int C0 = decltype(ci)::value * CH, LEN = (SEG - C0 < CH ? SEG - C0 : CH) * B;
        u32 e01, o01, e23, o23;
        pair_codes<B>(bits_at<C0 * B, LEN>(w[0]), bits_at<C0 * B, LEN>(w[1]), e01, o01);
        pair_codes<B>(bits_at<C0 * B, LEN>(w[2]), bits_at<C0 * B, LEN>(w[3]), e23, o23);
        static_for<0, LEN / B / 2>([&](auto ki) {
          constexpr int k = decltype(ki)::value, i = C0 / 2 + k;
          // Rows gid, gid+8 of m-tile i: dims 2i, 2i+1 of the lane's eighth.
          const u32 a0 = lds_at(lut, bits_scaled<2 * k * B, 2 * B, 7>(&e01) | lane4);
          const u32 a1 = lds_at(lut, bits_scaled<2 * k * B, 2 * B, 7>(&o01) | lane4);
          const u32 a2 = lds_at(lut, bits_scaled<2 * k * B, 2 * B, 7>(&e23) | lane4);
          const u32 a3 = lds_at(lut, bits_scaled<2 * k * B, 2 * B, 7>(&o23) | lane4);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            mma16816(acc[M0 + i][nt], a0, a1, a2, a3, bhi[nt][0], bhi[nt][1]);
            if constexpr (!PACK) mma16816(acc[M0 + i][nt], a0, a1, a2, a3, blo[nt][0], blo[nt][1]);
          }
        });
      });
    });
    __syncwarp();  // every lane is done with this stage before it is refilled
    if (it + STAGES - 1 < my_tiles) issue(it + STAGES - 1);
    cp_async_commit();
  }
  cp_async_wait<0>();
  if constexpr (PACK) {  // column h (P'_hi products) + column h + 4 (P'_lo products)
#pragma unroll
    for (int i = 0; i < VTILES; ++i)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][0][k] += __shfl_xor_sync(0xffffffffu, acc[i][0][k], 2);
  }

  // ---- merge the block's warps, one n-tile (up to 8 heads) per round: each warp stores its state
  //      (m, l, acc per head) over the tables and ring, now unused, then the block writes one
  //      partial per head, rows (bh, blockIdx.x, head). acc element (m-tile i of field f, row
  //      gid[+8]) is value dim foff(f) + gid*G/8 + 2*(i - M0) [+1].
  // Rows of WS floats hold dim at dim + dim/16 and WS = 4 (mod 16): the lanes' stores (dims
  // gid*G/8 + 2i of heads 2t + e) and the merge's loads spread over the banks.
  constexpr int HR = GQ < 8 ? GQ : 8;  // heads per round
  constexpr int WS = VQD + VQD / 16 + (20 - (VQD + VQD / 16) % 16) % 16;
  float* wm = reinterpret_cast<float*>(smem);  // [NWARPS][HR]
  float* wl = wm + NWARPS * HR;                 // [NWARPS][HR]
  float* wacc = wl + NWARPS * HR;               // [NWARPS][HR][WS]
  const u64 prow0 = (static_cast<u64>(bh) * gridDim.x + blockIdx.x) * GQ;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    __syncthreads();  // the tables and ring (or the previous round's states) are no longer read
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float l = l_run[nt][e];
      l += __shfl_xor_sync(0xffffffffu, l, 4);
      l += __shfl_xor_sync(0xffffffffu, l, 8);
      l += __shfl_xor_sync(0xffffffffu, l, 16);
      const int hr = 2 * t + e;
      if (nt * 8 + hr < GQ) {
        if (gid == 0) {
          wm[warp * HR + hr] = m_run[nt][e];
          wl[warp * HR + hr] = l;
        }
        float* dst = wacc + (warp * HR + hr) * WS;
        static_for<0, VNF>([&](auto fi) {
          constexpr int f = decltype(fi)::value, G = VC::fdim(f), M0 = VC::foff(f) / 16;
#pragma unroll
          for (int i = 0; i < G / 16; ++i) {
            const int dim = VC::foff(f) + gid * (G / 8) + 2 * i;
            dst[dim + dim / 16] = acc[M0 + i][nt][e];
            dst[dim + 1 + dim / 16] = acc[M0 + i][nt][2 + e];  // dim even: same 16-dim run
          }
        });
      }
    }
    __syncthreads();
    const int heads = min(HR, GQ - nt * 8);
    for (int i = threadIdx.x; i < heads * (VQD + 1); i += NWARPS * 32) {
      const int hr = i % heads, dim = i / heads - 1;  // dim -1: the row's m and l
      float mx = -TQ_INF;
#pragma unroll
      for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, wm[w * HR + hr]);
      const float ms = mx == -TQ_INF ? 0.f : mx;
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < NWARPS; ++w)
        a = fmaf(exp2f(wm[w * HR + hr] - ms), dim < 0 ? wl[w * HR + hr] : wacc[(w * HR + hr) * WS + dim + dim / 16], a);
      const u64 prow = prow0 + nt * 8 + hr;
      if (dim < 0) {
        part_m[prow] = mx;
        part_l[prow] = a;
      } else {
        part_acc[prow * VQD + dim] = a;
      }
    }
  }
}

// ------------------------------------------------------------------------------------ reduce
// Dynamic shared memory: w[nparts] | y[VQD] | z[D] | tail acc[D] | q[D] | logits[32] | red[32] |
// per-warp partial sums yw[nwarps][VQD]. Partials (one per split block) are merged in parallel
// (threads over parts for the max and the weights, warps over parts for the accumulators).
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
  float* red = lg + 32;
  float* yw = red + 32;
  const int row = blockIdx.x, bh = row / GQ, h = row % GQ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const u64 prow0 = static_cast<u64>(bh) * nparts * GQ + h;  // partial p of this row: prow0 + p * GQ

  float M = -TQ_INF;
  for (int p = threadIdx.x; p < nparts; p += blockDim.x) M = fmaxf(M, part_m[prow0 + static_cast<u64>(p) * GQ]);
  M = block_reduce(M, red, [](float a, float b) { return fmaxf(a, b); });
  const float Ms = M == -TQ_INF ? 0.f : M;
  float L = 0.f;
  for (int p = threadIdx.x; p < nparts; p += blockDim.x) {
    const u64 pr = prow0 + static_cast<u64>(p) * GQ;
    const float wp = exp2f(part_m[pr] - Ms);
    L += wp * part_l[pr];
    w[p] = wp;
  }
  L = block_reduce(L, red, [](float a, float b) { return a + b; });
  constexpr int YPL = (VQD + 31) / 32;  // accumulator columns per lane
  float ya[YPL];
#pragma unroll
  for (int k = 0; k < YPL; ++k) ya[k] = 0.f;
  for (int p = warp; p < nparts; p += nw) {
    const float* src = part_acc + (prow0 + static_cast<u64>(p) * GQ) * VQD;
    const float wp = w[p];
#pragma unroll
    for (int k = 0; k < YPL; ++k)
      if (lane + 32 * k < VQD) ya[k] = fmaf(wp, src[lane + 32 * k], ya[k]);
  }
#pragma unroll
  for (int k = 0; k < YPL; ++k)
    if (lane + 32 * k < VQD) yw[warp * VQD + lane + 32 * k] = ya[k];
  __syncthreads();
  for (int j = threadIdx.x; j < VQD; j += blockDim.x) {
    float a = 0.f;
    for (int v = 0; v < nw; ++v) a += yw[v * VQD + j];
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
  for_group_rows<VC>([&](auto gi, int i) {
    constexpr int g = decltype(gi)::value, G = VC::gdim(g), fc = g * (1 + VC::QJL);
    float a = y[VC::foff(fc) + i];
    if constexpr (VC::QJL) a += dot_column<G>(vtab + VC::gproj(g), y + VC::foff(fc + 1), i);
    z[VC::gstart(g) + i] = a;
  });
  __syncthreads();
  const float invL = 1.f / L;
  for_group_rows<VC>([&](auto gi, int i) {
    constexpr int g = decltype(gi)::value, G = VC::gdim(g);
    const float a = dot_column<G>(vtab + VC::grot(g), z + VC::gstart(g), i);
    const int pos = VC::gstart(g) + i;
    const int ch = vch ? vch[static_cast<u64>(bh) * D + pos] : pos;
    out[static_cast<u64>(row) * D + ch] = (a + ta[ch]) * invL;
  });
}
