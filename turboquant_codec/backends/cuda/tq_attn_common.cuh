// Device code shared by the fused decode attention kernels: tq_attention.cu (contiguous K/V
// streams) and tq_paged.cu (a vLLM-style paged block cache).
//
// Owns what is the same logic for both: the query preparation (rotate, scale, float16 hi + lo), the
// split kernels' pair tables, per-warp cp.async ring loop and per-tile work (tensor-core scores and
// values, online softmax), the merge of a block's warps into one partial, and the reduce's merge of
// partials and un-rotation. Each source keeps how its tiles are addressed and copied and what else
// joins the softmax (the contiguous kernel's uncompressed tail, the paged kernel's raw partial).
// Include after TQ_CODEC(KC, K) and TQ_CODEC(VC, V), with the macros GQ (query heads per KV head)
// and KV_SAME_LUT (V shares K's pair tables) defined.
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
// one table when their codebooks coincide (KV_SAME_LUT). P' carries a per-warp power-of-two range
// factor (WarpAttn::vinv) so that value norms past float16's range (record norms are bfloat16)
// neither overflow P' to inf nor change anything for norms inside it.
#pragma once

#include "tq_common.cuh"

#define NT ((GQ + 7) / 8)  // n-tiles of 8 query heads
// Up to 4 query heads per KV head: one n-tile's columns 0-3 carry the heads' hi halves and columns
// 4-7 their lo halves (query in the score product, P' in the value product), so a single mma
// does the work of two; partner columns h and h + 4 are summed across lanes t and t ^ 2.
#define PACK (GQ <= 4)
#define TILE 16  // tokens per tile (the mma M / K extent)

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
// Query row `row`, already in the key's record channel order in qp[D] (shared): rotated into
// qf[QD] (shared), scaled by scale * log2 e and stored as float16 hi and lo halves
// qh[row][2][QD] with its range factor qscale[row]. red: 32 floats of shared scratch.
__device__ __forceinline__ void prep_query(const float* __restrict__ ktab, const float* qp, float* qf,
                                           float* red, float scale, int row, u16* __restrict__ qh,
                                           float* __restrict__ qscale) {
  constexpr int QD = KC::fdims();
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
// Pair tables at the start of the split kernel's dynamic shared memory: K pairs, then V pairs
// unless V shares K's; lane L's copy of entry e is word 32e + L. Returns the first byte past them
// (the warps' rings). No barrier: the caller syncs before the first lookup.
template <int NW>
__device__ __forceinline__ u8* load_tables(u8* smem, const u32* __restrict__ klutv,
                                           const u32* __restrict__ vlutv, u32*& klut, u32*& vlut) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  klut = reinterpret_cast<u32*>(smem);
#if KV_SAME_LUT
  vlut = klut;
  u8* ring_all = reinterpret_cast<u8*>(klut + 32 * KC::lutn());
#else
  vlut = klut + 32 * KC::lutn();
  u8* ring_all = reinterpret_cast<u8*>(vlut + 32 * VC::lutn());
#endif
  // Warp w fills entries w, w + NW, ...: one broadcast load per entry and warp, unrolled so that
  // the loads of several entries are in flight at once (the tables come from L2).
#pragma unroll 4
  for (int e = warp; e < KC::lutn(); e += NW) klut[32 * e + lane] = klutv[e];
#if !KV_SAME_LUT
#pragma unroll 4
  for (int e = warp; e < VC::lutn(); e += NW) vlut[32 * e + lane] = vlutv[e];
#else
  (void)vlutv;
#endif
  return ring_all;
}

// A warp's ring of STAGES_ cp.async stages over its tiles [0, n): issue(it) starts tile it's
// copies into stage it % STAGES_, body(it) runs once they have landed; copies run STAGES_ - 1
// tiles ahead. Every cp.async group is complete on return.
template <int STAGES_, class Issue, class Body>
__device__ __forceinline__ void ring_loop(int n, Issue issue, Body body) {
#pragma unroll
  for (int s = 0; s < STAGES_ - 1; ++s) {
    if (s < n) issue(s);
    cp_async_commit();
  }
  for (int it = 0; it < n; ++it) {
    cp_async_wait<STAGES_ - 2>();
    __syncwarp();
    body(it);
    __syncwarp();  // every lane is done with this stage before it is refilled
    if (it + STAGES_ - 1 < n) issue(it + STAGES_ - 1);
    cp_async_commit();
  }
  cp_async_wait<0>();
}

// One warp's flash-decoding state over its run of tiles: the query fragments of its KV stream, and
// per query head the running max m, sum l (log2 domain) and V accumulators acc (rotated domain,
// value-product fragment layout, scaled by vinv until the merge).
struct WarpAttn {
  static constexpr int KQD = KC::fdims(), VQD = VC::fdims(), KNF = KC::nf(), VNF = VC::nf();
  static constexpr int KSTEPS = KQD / 16, QW = PACK ? 2 : 4;
  static constexpr int VTILES = VQD / 16;  // m-tiles over all V fields
  const u32* klut;
  const u32* vlut;
  int gid, t;
  u32 lane4;  // byte offset of this lane's copy of a table entry
  u32 qf[KSTEPS][NT][QW];
  float qsc[NT][2];
  float acc[VTILES][NT][4];
  float m_run[NT][2], l_run[NT][2];
  // P' range factor, a power of two <= 1 (warp-uniform): P' = p * value scale * vinv and acc holds
  // the value sums times vinv. 1 unless a tile's value scales reach P_TOP (value_range).
  float vinv;
  static constexpr int P_EXP = 15;
  static constexpr float P_TOP = 1 << P_EXP;  // P' = p * scale * vinv < P_TOP (p <= 1): below 65504

  // Query fragments of KV stream bh (query rows bh * GQ + head of qh / qscale) for every K field and
  // k-step, in registers for the whole run: (hi, lo) B fragments, or with PACK one fragment whose
  // column gid is head gid & 3, half gid >> 2. Empty softmax states.
  __device__ __forceinline__ WarpAttn(const u32* klut_, const u32* vlut_, const u16* __restrict__ qh,
                                      const float* __restrict__ qscale, int bh)
      : klut(klut_), vlut(vlut_), gid((threadIdx.x & 31) >> 2), t(threadIdx.x & 3),
        lane4((threadIdx.x & 31) << 2) {
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
#pragma unroll
    for (int i = 0; i < VTILES; ++i)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][nt][c] = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        m_run[nt][e] = -TQ_INF;
        l_run[nt][e] = 0.f;
      }
    vinv = 1.f;
  }

  // vinv for a tile whose largest finite value scale on this lane is `top`: the largest power of
  // two <= 1 that keeps the warp's largest below P_TOP, acc rescaled to it (exact: powers of two).
  // Set per tile, so a tile's P' use float16's whole range [2^-24, 2^15) (hi + lo: float32-level
  // products down to 2^-14) whatever the norms of other tiles. Warp-uniform; called only where a
  // value scale reaches P_TOP or vinv is not 1 (value norms near or past 32768, whose P' would
  // otherwise overflow float16): other streams keep vinv = 1 and their exact results.
  __device__ __forceinline__ void value_range(float top) {
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 4));
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 8));
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 16));
    int ex;
    frexpf(top, &ex);  // top < 2^ex (ex = 0 for top = 0)
    const int want = min(0, P_EXP - ex), have = ilogbf(vinv);  // top * 2^want < P_TOP
    if (want == have) return;
    const float a = ldexpf(1.f, want - have);
    scale_acc(a);
    vinv = ldexpf(1.f, want);
  }

  __device__ __forceinline__ void scale_acc(const float a) {
#pragma unroll
    for (int i = 0; i < VTILES; ++i)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][nt][c] *= a;
  }

  // One tile of 16 tokens in shared memory: K records at kt, V records at vt, KS / VS bytes apart;
  // `left` tokens of the stream from this tile on (rows at or past it are masked).
  template <int KS, int VS>
  __device__ __forceinline__ void tile(const u8* kt, const u8* vt, int left) {
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
      load_stream<NWD>(kt + gid * KS, KC::fbitoff(f) + t * SEGB, w0);
      load_stream<NWD>(kt + (gid + 8) * KS, KC::fbitoff(f) + t * SEGB, w1);
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
      const float sc0 = rec_norm(kt + gid * KS, KC::fscale(f)) * KC::pfactor(f);
      const float sc1 = rec_norm(kt + (gid + 8) * KS, KC::fscale(f)) * KC::pfactor(f);
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
    //      P' = p * per-token value scale * vinv split into float16 hi + lo (float32-level
    //      products). First vinv, from the tile's largest value scale (masked rows may hold any
    //      bytes: stale slots; an infinite or NaN scale is left out, its product is inf / NaN
    //      whatever the factor).
    {
      float top = 0.f;
      static_for<0, VNF>([&](auto fi) {
        constexpr int f = decltype(fi)::value;
        const float s0 = valid0 ? rec_norm(vt + gid * VS, VC::fscale(f)) * VC::pfactor(f) : 0.f;
        const float s1 = valid1 ? rec_norm(vt + (gid + 8) * VS, VC::fscale(f)) * VC::pfactor(f) : 0.f;
        top = fmaxf(top, fmaxf(s0 < TQ_INF ? s0 : 0.f, s1 < TQ_INF ? s1 : 0.f));
      });
      if (__any_sync(0xffffffffu, vinv != 1.f || top >= P_TOP)) value_range(top);
    }
    static_for<0, VNF>([&](auto fi) {
      constexpr int f = decltype(fi)::value, G = VC::fdim(f), B = VC::fbits(f);
      constexpr int SEG = G / 8, NWD = (SEG * B + 31) / 32, M0 = VC::foff(f) / 16;
      const float fv = VC::pfactor(f) * vinv;  // exact: vinv is a power of two
      const float sc[2] = {rec_norm(vt + gid * VS, VC::fscale(f)) * fv,
                           rec_norm(vt + (gid + 8) * VS, VC::fscale(f)) * fv};
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
      (void)blo;
      // Lane decodes one contiguous eighth of the field (dims gid*SEG ..) for tokens 2t, 2t+1,
      // 2t+8, 2t+9. pair_codes interleaves two tokens' codes of one dim into pair-table indices.
      const u32* lut = vlut + 32 * VC::flut(f);
      u32 w[4][NWD];
      const int rows[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
      for (int r = 0; r < 4; ++r) load_stream<NWD>(vt + rows[r] * VS, VC::fbitoff(f) + gid * SEG * B, w[r]);
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
  }

  // After the last tile: merge the block's NW warps, one n-tile (up to 8 heads) per round. Each
  // warp stores its state (m, l, acc per head) at smem, over the tables and rings, now unused; the
  // block then writes one partial per head, rows prow0 + head of part_m, part_l (log2 domain) and
  // part_acc (VQD each). acc element (m-tile i of field f, row gid[+8]) is value dim
  // foff(f) + gid*G/8 + 2*(i - M0) [+1].
  template <int NW>
  __device__ __forceinline__ void merge(u8* smem, u64 prow0, float* __restrict__ part_m,
                                        float* __restrict__ part_l, float* __restrict__ part_acc) {
    const int warp = threadIdx.x >> 5;
    if (vinv != 1.f) {  // acc back to the value sums (exact: vinv is a power of two)
      scale_acc(ldexpf(1.f, -ilogbf(vinv)));
    }
    if constexpr (PACK) {  // column h (P'_hi products) + column h + 4 (P'_lo products)
#pragma unroll
      for (int i = 0; i < VTILES; ++i)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[i][0][k] += __shfl_xor_sync(0xffffffffu, acc[i][0][k], 2);
    }
    // Rows of WS floats hold dim at dim + dim/16 and WS = 4 (mod 16): the lanes' stores (dims
    // gid*G/8 + 2i of heads 2t + e) and the merge's loads spread over the banks.
    constexpr int HR = GQ < 8 ? GQ : 8;  // heads per round
    constexpr int WS = VQD + VQD / 16 + (20 - (VQD + VQD / 16) % 16) % 16;
    float* wm = reinterpret_cast<float*>(smem);  // [NW][HR]
    float* wl = wm + NW * HR;                     // [NW][HR]
    float* wacc = wl + NW * HR;                   // [NW][HR][WS]
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
      for (int i = threadIdx.x; i < heads * (VQD + 1); i += NW * 32) {
        const int hr = i % heads, dim = i / heads - 1;  // dim -1: the row's m and l
        float mx = -TQ_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) mx = fmaxf(mx, wm[w * HR + hr]);
        const float ms = mx == -TQ_INF ? 0.f : mx;
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w)
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
};

// ------------------------------------------------------------------------------------ reduce
struct Merged {
  float M;   // max over the partials and the starting max (log2 domain)
  float Ms;  // M, or 0 where M is -inf: the weights' reference
  float L;   // sum of weight * l over the partials
};

// Merges the nparts partials of one output row (partial p at row prow0 + p * GQ of part_m, part_l,
// part_acc) in parallel: threads over parts for the max and the weights, warps over parts for the
// accumulators. m0 joins the max; y[VQD] receives sum of weight * acc. Shared scratch: w[nparts],
// yw[nwarps][VQD], red[32]. y is written without a closing barrier.
__device__ __forceinline__ Merged merge_partials(const float* __restrict__ part_m,
                                                 const float* __restrict__ part_l,
                                                 const float* __restrict__ part_acc, int nparts,
                                                 u64 prow0, float m0, float* w, float* y, float* yw,
                                                 float* red) {
  constexpr int VQD = VC::fdims();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float M = m0;
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
  return Merged{M, Ms, L};
}

// Rotated domain -> record channel order: z_g = y_code + S^T y_sign, x_g = rotation^T z_g, then
// emit(pos, x[pos]) for every position pos of the value record (z: D floats of shared scratch).
template <class Emit>
__device__ __forceinline__ void unrotate_values(const float* __restrict__ vtab, const float* y, float* z,
                                                Emit emit) {
  for_group_rows<VC>([&](auto gi, int i) {
    constexpr int g = decltype(gi)::value, G = VC::gdim(g), fc = g * (1 + VC::QJL);
    float a = y[VC::foff(fc) + i];
    if constexpr (VC::QJL) a += dot_column<G>(vtab + VC::gproj(g), y + VC::foff(fc + 1), i);
    z[VC::gstart(g) + i] = a;
  });
  __syncthreads();
  for_group_rows<VC>([&](auto gi, int i) {
    constexpr int g = decltype(gi)::value, G = VC::gdim(g);
    const float a = dot_column<G>(vtab + VC::grot(g), z + VC::gstart(g), i);
    emit(VC::gstart(g) + i, a);
  });
}
