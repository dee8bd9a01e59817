// Fused paged decode attention over a TurboQuant-compressed vLLM-style block cache.
//
// Layout read here (PagedCache's; byte strides arrive as arguments, the token stride as a macro):
//   k record of (block b, slot o, KV head h): kc + b*k_sb + h*k_sh + o*KTS, K_R bytes
//   v record                                : vc + b*v_sb + h*v_sh + o*VTS, V_R bytes
//   MERGED: vc == kc + VOFF with the same strides (vLLM's packed [num_blocks, H, block_size, R_k+R_v]
//   tensor seen as [num_blocks, block_size, H, R] views): the 16 K+V states of one tile are one
//   contiguous span of 16*KTS bytes, copied once.
//   block_table [B, bt_stride] int32, seq_lens [B] int32, raw_slot_of_block [num_blocks] int32,
//   raw_k/raw_v [num_raw, BS, H, D] (element strides as arguments), new key/value [T, H, D].
// Decode request r (r < num_decodes) owns query row r and context tokens 0 .. seq_lens[r] - 2 in the
// cache; its own new token comes raw from key/value row r.
//
// Kernels (cupy_paged.paged_attention launches them on the caller's stream, no host sync):
//   tq_paged_prep    grid (rows + raw blocks), RAW_THREADS threads. Blocks < rows (= n_dec*h_q):
//                    tq_attn_prep's query preparation (permute by the KV head's key channels, rotate,
//                    fold scale*log2(e), float16 hi+lo). Blocks past them: the RAW partial of one KV
//                    stream each (its new token and every context token whose block has a raw row,
//                    float32, original domain, all GQ heads of the group, block-table order); it
//                    needs no other kernel's output. Launched either as one grid (rows + n_dec*H), or,
//                    for many streams, as a rows-only grid plus a raws-only grid (rows = 0) on a side
//                    stream forked from the caller's and joined before tq_paged_reduce, so the raw
//                    partials overlap the split instead of delaying it.
//   tq_paged_split   grid (nchunks, n_dec*H), NWARPS warps. Row bh = r*H + h, column c: chunk c covers
//                    tiles [c*NWARPS*TPW, (c+1)*NWARPS*TPW) of the context (a tile = 16 tokens of one
//                    block, BS a multiple of 16): tq_attn_split's maths (tensor-core scores and
//                    values from per-lane pair tables, online softmax per warp, the block's warps
//                    merged into one partial), the records copied in place through the block table.
//                    Tiles whose block is out of range or has a raw row are skipped (no copy, no
//                    work). Chunk boundaries are fixed in tokens (NWARPS, TPW compile-time), so a
//                    request's partials, and its output, do not depend on the batch it shares a
//                    launch with; chunks past a request's context exit at once.
//   tq_paged_reduce  grid (n_dec*h_q), block 256: merges the request's chunk partials (rotated
//                    domain) and its raw partial (original domain), un-rotates once, scatters
//                    through the value channels and writes the output row in the output's dtype.
//
// Shared with tq_attention.cu through tq_attn_common.cuh (which also describes the fragment and
// pair-table layouts): the query preparation, the per-tile maths, the warp merge and the merge of
// partials. This file keeps the paged addressing and the raw partial.
#include "tq_common.cuh"

TQ_CODEC(KC, K)
TQ_CODEC(VC, V)
#ifndef TQ_PAGED_WRITE  // the write module builds the scatter kernel alone (no query heads)
#include "tq_attn_common.cuh"
#endif

#ifndef NWARPS
#define NWARPS 16
#endif
#ifndef MINBLOCKS
#define MINBLOCKS 1
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef TPW
#define TPW 16  // tiles per warp and chunk: the fixed split (<= 32: one tile per lane of the lookup)
#endif
#ifndef RAW_T
#define RAW_T 64  // raw tokens staged per round of the raw partial
#endif
#define SPAN_K (TILE * KTS)
#define SPAN_V (TILE * VTS)
#define TILE_BYTES_K (SPAN_K + 32)  // + 16 B over-read padding (load_stream) + alignment slack
#if MERGED
#define TILE_BYTES_V 0
#else
#define TILE_BYTES_V (SPAN_V + 32)
#endif
#define STAGE_BYTES (((TILE_BYTES_K + TILE_BYTES_V) + 15) / 16 * 16)

static_assert(KC::D == VC::D, "K and V head dims differ");
#ifndef TQ_PAGED_WRITE
static_assert(TPW >= 1 && TPW <= 32, "TPW: one tile per lane");
static_assert(BS % TILE == 0, "the fused kernel reads whole 16-token tiles of a block");
static_assert(KTS % 4 == 0 && VTS % 4 == 0 && VOFF % 4 == 0, "records must be 4-byte aligned");
#endif

template <int KIND>
__device__ __forceinline__ void store_float(void* p, u64 i, float v) {
  if constexpr (KIND == TQ_F32) {
    static_cast<float*>(p)[i] = v;
  } else if constexpr (KIND == TQ_F16) {
    static_cast<u16*>(p)[i] = f2h(v);
  } else {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    static_cast<u16*>(p)[i] = h;
  }
}

// Context tokens of decode request r in the cache: seq_lens[r] - 1, clamped to the block table.
__device__ __forceinline__ int context_len(const int* seq_lens, int r, int max_tokens) {
  return max(0, min(seq_lens[r] - 1, max_tokens));
}

struct RawArgs {
  const void* key;  // new tokens [T, H, D] (NEW_KIND), element strides
  const void* value;
  long long kv_st, kv_sh, vv_st, vv_sh;
  void* raw_k;  // raw pool (RAW_KIND), element strides (block, slot, head)
  void* raw_v;
  long long rk_s0, rk_s1, rk_s2, rv_s0, rv_s1, rv_s2;
  int num_raw;
};
// The RawArgs fields as kernel parameters (CuPy passes scalars and pointers, not structs).
#define RAW_PARAMS                                                                              \
  const void *key, const void *value, long long kv_st, long long kv_sh, long long vv_st,         \
      long long vv_sh, void *raw_k, void *raw_v, long long rk_s0, long long rk_s1, long long rk_s2, \
      long long rv_s0, long long rv_s1, long long rv_s2, int num_raw
#define RAW_ARGS \
  RawArgs { key, value, kv_st, kv_sh, vv_st, vv_sh, raw_k, raw_v, rk_s0, rk_s1, rk_s2, rv_s0, rv_s1, rv_s2, num_raw }

#ifndef TQ_PAGED_WRITE
// ------------------------------------------------------------------------------------ raw partial
#define RAW_THREADS (NWARPS * 32)  // threads of tq_paged_prep (its raw blocks use them all)
#ifndef RAW_SCAN
#define RAW_SCAN 8  // block-table entries per thread and pass of the raw scan
#endif

struct __align__(16) V16 {
  u32 x, y, z, w;
};

// 16 bytes of KIND values -> floats at dst.
template <int KIND>
__device__ __forceinline__ void unpack16(const V16& v, float* dst) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (KIND == TQ_F32) {
      dst[k] = __uint_as_float(w[k]);
    } else if constexpr (KIND == TQ_F16) {
      dst[2 * k] = h2f(static_cast<u16>(w[k]));
      dst[2 * k + 1] = h2f(static_cast<u16>(w[k] >> 16));
    } else {
      dst[2 * k] = __uint_as_float(w[k] << 16);
      dst[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
}

// One KV stream's raw partial for its GQ query rows: m (log2 domain), l and acc[D] (original
// channel order) over its new token and its raw-pool context tokens, in block-table order.
// Shared memory (floats): qs[GQ][D] | kb[RAW_T][D] | vb[RAW_T][D] | lg[RAW_T][GQ] | mh, lh, al[GQ]
// | ints: staged slot rows and offsets [RAW_T] each | listed raw rows and lengths [RAW_THREADS *
// RAW_SCAN] each | warp counts [32] (cupy_paged._raw_smem mirrors this).
__device__ void raw_partial(u8* smem, const RawArgs& a, const void* __restrict__ q, long long q_st,
                            long long q_sh, float scale, const int* __restrict__ bt_row, int nblk, int ctx,
                            const int* __restrict__ raw_slot, int num_blocks, int r, int kvh, int h_kv,
                            float* __restrict__ raw_m, float* __restrict__ raw_l,
                            float* __restrict__ raw_acc) {
  constexpr int D = KC::D, NT_ = RAW_THREADS, NW_ = NT_ / 32, ACCN = (GQ * D + NT_ - 1) / NT_;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* qs = reinterpret_cast<float*>(smem);
  float* kb = qs + GQ * D;
  float* vb = kb + RAW_T * D;
  float* lg = vb + RAW_T * D;
  float* mh = lg + RAW_T * GQ;
  float* lh = mh + GQ;
  float* al = lh + GQ;
  int* srow = reinterpret_cast<int*>(al + GQ);  // per staged token: raw row (-1: the new token)
  int* soff = srow + RAW_T;                     // slot in its block, -1: invalid
  int* lrow = soff + RAW_T;                     // listed raw blocks of the current pass
  int* llen = lrow + NT_ * RAW_SCAN;
  int* wcnt = llen + NT_ * RAW_SCAN;

  const u64 row0 = (static_cast<u64>(r) * h_kv + kvh) * GQ;
  for (int i = tid; i < GQ * D; i += NT_) {
    const int g = i / D, dim = i - g * D;
    qs[i] = load_float<IN_KIND>(q, static_cast<u64>(r) * q_st + static_cast<u64>(kvh * GQ + g) * q_sh + dim) *
            (scale * LOG2E);
  }
  if (tid < GQ) {
    mh[tid] = -TQ_INF;
    lh[tid] = 0.f;
  }
  float acc[ACCN];
#pragma unroll
  for (int k = 0; k < ACCN; ++k) acc[k] = 0.f;

  // One round over the staged tokens (srow/soff set, soff -1 = none): load, logits, softmax update
  // (warp g for head g, lanes over tokens), values.
  auto round = [&](bool new_token) {
    __syncthreads();  // srow/soff written; the previous round's buffers no longer read
    // Raw-pool rows in 16-byte chunks, every load of the round in flight before the first use (the
    // host checks the pool's alignment); the new token's row (srow -1) element by element.
    constexpr int ES = RAW_KIND == TQ_F32 ? 4 : 2, EPC = 16 / ES, CPR = D / EPC;
    constexpr int CPT = (RAW_T * CPR + NT_ - 1) / NT_;
    V16 kr[CPT], vr[CPT];
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int i = tid + c * NT_, s = i / CPR, ch = i - s * CPR;
      kr[c] = vr[c] = V16{0u, 0u, 0u, 0u};
      if (i < RAW_T * CPR && soff[s] >= 0 && srow[s] >= 0) {
        const u64 ek = static_cast<u64>(srow[s]) * a.rk_s0 + soff[s] * a.rk_s1 + kvh * a.rk_s2 + ch * EPC;
        const u64 ev = static_cast<u64>(srow[s]) * a.rv_s0 + soff[s] * a.rv_s1 + kvh * a.rv_s2 + ch * EPC;
        kr[c] = *reinterpret_cast<const V16*>(static_cast<const u8*>(a.raw_k) + ek * ES);
        vr[c] = *reinterpret_cast<const V16*>(static_cast<const u8*>(a.raw_v) + ev * ES);
      }
    }
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int i = tid + c * NT_, s = i / CPR, ch = i - s * CPR;
      if (i < RAW_T * CPR && !(new_token && s == 0)) {
        unpack16<RAW_KIND>(kr[c], kb + s * D + ch * EPC);
        unpack16<RAW_KIND>(vr[c], vb + s * D + ch * EPC);
      }
    }
    if (new_token)
      for (int i = tid; i < D; i += NT_) {
        kb[i] = load_float<NEW_KIND>(a.key, static_cast<u64>(r) * a.kv_st + kvh * a.kv_sh + i);
        vb[i] = load_float<NEW_KIND>(a.value, static_cast<u64>(r) * a.vv_st + kvh * a.vv_sh + i);
      }
    __syncthreads();
    for (int s = warp; s < RAW_T; s += NW_) {
      float d[GQ];
#pragma unroll
      for (int g = 0; g < GQ; ++g) d[g] = 0.f;
      for (int i = lane; i < D; i += 32) {
        const float kv = kb[s * D + i];
#pragma unroll
        for (int g = 0; g < GQ; ++g) d[g] = fmaf(qs[g * D + i], kv, d[g]);
      }
      const bool ok = soff[s] >= 0;
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        float v = d[g];
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) lg[s * GQ + g] = ok ? v : -TQ_INF;
      }
    }
    __syncthreads();
    for (int g = warp; g < GQ; g += NW_) {
      float mx = -TQ_INF;
      for (int s = lane; s < RAW_T; s += 32) mx = fmaxf(mx, lg[s * GQ + g]);
      for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mo = mh[g], mn = fmaxf(mo, mx), ms = mn == -TQ_INF ? 0.f : mn;
      float l = 0.f;
      for (int s = lane; s < RAW_T; s += 32) {
        const float p = exp2f(lg[s * GQ + g] - ms);
        lg[s * GQ + g] = p;
        l += p;
      }
      for (int o = 16; o; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(mo - ms);
        lh[g] = lh[g] * alpha + l;
        mh[g] = mn;
        al[g] = alpha;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < ACCN; ++k) {
      const int i = tid + k * NT_;
      if (i < GQ * D) {
        const int g = i / D, dim = i - g * D;
        float x = acc[k] * al[g];
        for (int s = 0; s < RAW_T; ++s) x = fmaf(lg[s * GQ + g], vb[s * D + dim], x);
        acc[k] = x;
      }
    }
  };

  // Passes over the block table (at least one: the new token, staged first); each lists its raw
  // blocks in order, then stages their tokens RAW_T at a time.
  for (int j0 = 0; j0 < max(nblk, 1); j0 += NT_ * RAW_SCAN) {
    // Thread tid scans entries j0 + tid*RAW_SCAN + i (all loads in flight at once).
    int rs[RAW_SCAN];
    int cnt = 0;
#pragma unroll
    for (int i = 0; i < RAW_SCAN; ++i) {
      const int lb = j0 + tid * RAW_SCAN + i;
      const int b = raw_slot != nullptr && lb < nblk ? bt_row[lb] : -1;
      rs[i] = b >= 0 && b < num_blocks ? b : -1;
    }
#pragma unroll
    for (int i = 0; i < RAW_SCAN; ++i) {
      const int x = rs[i] >= 0 ? raw_slot[rs[i]] : -1;
      rs[i] = x < a.num_raw ? x : -1;
      cnt += rs[i] >= 0;
    }
    int incl = cnt;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    __syncthreads();  // the previous pass's list is no longer read
    if (lane == 31) wcnt[warp] = incl;
    __syncthreads();
    int base = incl - cnt, total = 0;
    for (int w = 0; w < NW_; ++w) {
      base += w < warp ? wcnt[w] : 0;
      total += wcnt[w];
    }
#pragma unroll
    for (int i = 0; i < RAW_SCAN; ++i)
      if (rs[i] >= 0) {
        const int lb = j0 + tid * RAW_SCAN + i;
        lrow[base] = rs[i];
        llen[base] = min(BS, ctx - lb * BS);
        ++base;
      }
    const int extra = j0 == 0 ? 1 : 0, ntok = extra + total * BS;
    for (int t0 = 0; t0 < ntok; t0 += RAW_T) {
      __syncthreads();  // list written; the previous round done with srow/soff
      for (int s = tid; s < RAW_T; s += NT_) {
        const int t = t0 + s;
        if (t < extra) {
          srow[s] = -1;
          soff[s] = 0;
        } else {
          const int u = t - extra, k = u / BS, o = u - k * BS;
          const bool ok = t < ntok && o < llen[k];
          srow[s] = ok ? lrow[k] : 0;
          soff[s] = ok ? o : -1;
        }
      }
      round(extra && t0 == 0);
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < ACCN; ++k) {
    const int i = tid + k * NT_;
    if (i < GQ * D) raw_acc[row0 * D + i] = acc[k];
  }
  if (tid < GQ) {
    raw_m[row0 + tid] = mh[tid];
    raw_l[row0 + tid] = lh[tid];
  }
}

// ------------------------------------------------------------------------------------ prep
extern "C" __global__ void __launch_bounds__(RAW_THREADS)
    tq_paged_prep(const void* __restrict__ q, long long q_st, long long q_sh, int h_q,
                  const u16* __restrict__ kch, const float* __restrict__ ktab, float scale,
                  u16* __restrict__ qh, float* __restrict__ qscale, int rows,
                  const int* __restrict__ block_table, int bt_stride, int max_blocks,
                  const int* __restrict__ seq_lens, const int* __restrict__ raw_slot, int num_blocks, int h_kv,
                  float* __restrict__ raw_m, float* __restrict__ raw_l, float* __restrict__ raw_acc,
                  RAW_PARAMS) {
  // Blocks past the first `rows`: one raw partial per KV stream (dynamic shared memory).
  if (static_cast<int>(blockIdx.x) >= rows) {
    extern __shared__ __align__(16) u8 dsm[];
    const int bh = blockIdx.x - rows, r = bh / h_kv, kvh = bh - r * h_kv;
    const int ctx = context_len(seq_lens, r, max_blocks * BS);
    raw_partial(dsm, RAW_ARGS, q, q_st, q_sh, scale, block_table + static_cast<long long>(r) * bt_stride,
                (ctx + BS - 1) / BS, ctx, raw_slot, num_blocks, r, kvh, h_kv, raw_m, raw_l, raw_acc);
    return;
  }
  constexpr int D = KC::D, QD = KC::fdims();
  __shared__ float qo[D], qp[D], qf[QD];
  __shared__ float red[32];
  const int row = blockIdx.x;  // r*h_q + head
  const int r = row / h_q, hq = row % h_q, kvh = hq / GQ;
  const u64 src = static_cast<u64>(r) * q_st + static_cast<u64>(hq) * q_sh;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = load_float<IN_KIND>(q, src + i);
    qo[i] = v;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    qp[i] = kch ? qo[min(static_cast<int>(kch[kvh * D + i]), D - 1)] : qo[i];
  __syncthreads();
  prep_query(ktab, qp, qf, red, scale, row, qh, qscale);
}

// ------------------------------------------------------------------------------------ split
__device__ __forceinline__ u64 shfl64(u64 v, int src) {
  const u32 lo = __shfl_sync(0xffffffffu, static_cast<u32>(v), src);
  const u32 hi = __shfl_sync(0xffffffffu, static_cast<u32>(v >> 32), src);
  return (static_cast<u64>(hi) << 32) | lo;
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32, MINBLOCKS)
    tq_paged_split(const u8* __restrict__ kc, const u8* __restrict__ vc, u64 k_end, u64 v_end,
                   long long k_sb, long long k_sh, long long v_sb, long long v_sh,
                   const int* __restrict__ block_table, int bt_stride, int max_blocks,
                   const int* __restrict__ seq_lens, const int* __restrict__ raw_slot, int num_blocks,
                   int h_kv, const u16* __restrict__ qh, const float* __restrict__ qscale,
                   const u32* __restrict__ klutv, const u32* __restrict__ vlutv,
                   float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc) {
  extern __shared__ __align__(16) u8 smem[];
  const int bh = blockIdx.y, r = bh / h_kv, kvh = bh - r * h_kv;
  const int* bt_row = block_table + static_cast<long long>(r) * bt_stride;
  const int ctx = context_len(seq_lens, r, max_blocks * BS);
  const int chunk = blockIdx.x, nchunks = gridDim.x;
  const int ntiles = (ctx + TILE - 1) / TILE;
  if (chunk * NWARPS * TPW >= ntiles) return;  // past this request's context (block-uniform)

  u32 *klut, *vlut;
  u8* ring_all = load_tables<NWARPS>(smem, klutv, vlutv, klut, vlut);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile0 = (chunk * NWARPS + warp) * TPW;
  const int my_tiles = max(0, min(TPW, ntiles - tile0));
  u8* ring = ring_all + warp * (STAGES * STAGE_BYTES);

  // Lane i looks up tile tile0 + i: its block, whether it is read from its records (in range, no
  // raw row), and the addresses of its K and V spans.
  u64 ka = 0;
#if !MERGED
  u64 va = 0;
#else
  (void)vc, (void)v_sb, (void)v_sh, (void)v_end;
#endif
  bool ok = false;
  if (lane < my_tiles) {
    const int tok = (tile0 + lane) * TILE, lb = tok / BS, ob = tok - lb * BS;
    const int b = lb < max_blocks ? bt_row[lb] : -1;
    ok = b >= 0 && b < num_blocks && (raw_slot == nullptr || raw_slot[b] < 0);
    if (ok) {
      ka = reinterpret_cast<u64>(kc) + static_cast<u64>(b) * k_sb + static_cast<u64>(kvh) * k_sh +
           static_cast<u64>(ob) * KTS;
#if !MERGED
      va = reinterpret_cast<u64>(vc) + static_cast<u64>(b) * v_sb + static_cast<u64>(kvh) * v_sh +
           static_cast<u64>(ob) * VTS;
#endif
    }
  }
  const u32 use = __ballot_sync(0xffffffffu, ok);
  __syncthreads();  // tables in place
  WarpAttn wa(klut, vlut, qh, qscale, bh);

  // A span of SPAN bytes at a 16-byte aligned address (the host checks pointers and strides);
  // chunks past `end` (the cache's last byte + 1) are zero-filled, never read.
  const u32 ring_lane = smem_addr(ring) + 16 * lane;
  auto copy_span = [&](u64 src, u64 end, auto span_bytes, u32 dst) {
    constexpr int SPAN = decltype(span_bytes)::value, CHUNKS = SPAN / 16;
    const u8* s = reinterpret_cast<const u8*>(src) + 16 * lane;
    if (src + SPAN <= end) {
#pragma unroll
      for (int k = 0; k < (CHUNKS + 31) / 32; ++k)
        if (lane + 32 * k < CHUNKS) cp_async16_full(dst + 512 * k, s + 512 * k);
    } else {
      const long long left = static_cast<long long>(end - src) - 16 * lane;
#pragma unroll
      for (int k = 0; k < (CHUNKS + 31) / 32; ++k)
        if (lane + 32 * k < CHUNKS) {
          const int nb = static_cast<int>(max(0ll, min(16ll, left - 512 * k)));
          cp_async16_shared(dst + 512 * k, nb ? s + 512 * k : reinterpret_cast<const u8*>(src), nb);
        }
    }
  };
  auto issue = [&](int it) {
    const u64 a_k = shfl64(ka, it);
#if !MERGED
    const u64 a_v = shfl64(va, it);
#endif
    if ((use >> it) & 1u) {
      const u32 st = ring_lane + (it % STAGES) * STAGE_BYTES;
      copy_span(a_k, k_end, Int<SPAN_K>{}, st);
#if !MERGED
      copy_span(a_v, v_end, Int<SPAN_V>{}, st + TILE_BYTES_K);
#endif
    }
  };
  ring_loop<STAGES>(my_tiles, issue, [&](int it) {
    if ((use >> it) & 1u) {
      const u8* st = ring + (it % STAGES) * STAGE_BYTES;
#if MERGED
      const u8* vt = st + VOFF;
#else
      const u8* vt = st + TILE_BYTES_K;
#endif
      wa.tile<KTS, VTS>(st, vt, ctx - (tile0 + it) * TILE);
    }
  });
  // One partial per head: rows (bh, chunk, head).
  wa.merge<NWARPS>(smem, (static_cast<u64>(bh) * nchunks + chunk) * GQ, part_m, part_l, part_acc);
}

// ------------------------------------------------------------------------------------ reduce
// Dynamic shared memory (floats): w[nchunks] | y[VQD] | z[D] | red[32] | yw[nwarps][VQD].
extern "C" __global__ void tq_paged_reduce(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                           const float* __restrict__ part_acc, int nchunks,
                                           const float* __restrict__ raw_m, const float* __restrict__ raw_l,
                                           const float* __restrict__ raw_acc,
                                           const int* __restrict__ seq_lens, int max_tokens, int h_q,
                                           const float* __restrict__ vtab, const u16* __restrict__ vch,
                                           void* __restrict__ out, long long o_st, long long o_sh) {
  constexpr int D = VC::D, VQD = VC::fdims();
  extern __shared__ __align__(16) float sm[];
  float* w = sm;
  float* y = w + nchunks;
  float* z = y + VQD;
  float* red = z + D;
  float* yw = red + 32;
  const int row = blockIdx.x, bh = row / GQ, h = row % GQ;
  const int r = row / h_q, kvh = (row % h_q) / GQ;
  const int ctx = context_len(seq_lens, r, max_tokens);
  const int nparts = ((ctx + TILE - 1) / TILE + NWARPS * TPW - 1) / (NWARPS * TPW);
  const u64 prow0 = static_cast<u64>(bh) * nchunks * GQ + h;

  // The chunk partials' max joins the raw partial's.
  const float rm = raw_m[row];
  const Merged mg = merge_partials(part_m, part_l, part_acc, nparts, prow0, rm, w, y, yw, red);
  const float wr = exp2f(rm - mg.Ms);
  const float L = mg.L + wr * raw_l[row];
  __syncthreads();

  const float invL = 1.f / L;
  const u64 obase = static_cast<u64>(r) * o_st + static_cast<u64>(row % h_q) * o_sh;
  unrotate_values(vtab, y, z, [&](int pos, float a) {
    const int ch = vch ? min(static_cast<int>(vch[kvh * D + pos]), D - 1) : pos;
    store_float<OUT_KIND>(out, obase + ch, (a + wr * raw_acc[static_cast<u64>(row) * D + ch]) * invL);
  });
}

#endif  // TQ_PAGED_WRITE

// ------------------------------------------------------------------------------------ write
// Scatter of encoded records and raw copies: grid (T), block 128. Token i with a slot in range
// writes its H K and V records (records [H, T, R], contiguous) to the cache views and, where its
// block has a raw row, its raw K/V (new-token dtype NEW_KIND -> pool dtype RAW_KIND).
extern "C" __global__ void tq_paged_scatter(const u8* __restrict__ krec, const u8* __restrict__ vrec, int T,
                                            int h_kv, const void* __restrict__ slots, int slot64, int n_slots,
                                            u8* __restrict__ kc, u8* __restrict__ vc, long long k_sb,
                                            long long k_ss, long long k_sh, long long v_sb, long long v_ss,
                                            long long v_sh, int num_blocks, int bs,
                                            const int* __restrict__ raw_slot, RAW_PARAMS) {
  constexpr int D = KC::D;
  const RawArgs ra = RAW_ARGS;
  const int i = blockIdx.x;
  if (i >= n_slots) return;
  const long long slot = slot64 ? static_cast<const long long*>(slots)[i] : static_cast<const int*>(slots)[i];
  if (slot < 0 || slot >= static_cast<long long>(num_blocks) * bs) return;
  const long long b = slot / bs, o = slot - b * bs;
  for (int j = threadIdx.x; j < h_kv * K_R; j += blockDim.x) {
    const int h = j / K_R, c = j - h * K_R;
    kc[b * k_sb + o * k_ss + h * k_sh + c] = krec[(static_cast<u64>(h) * T + i) * K_R + c];
  }
  for (int j = threadIdx.x; j < h_kv * V_R; j += blockDim.x) {
    const int h = j / V_R, c = j - h * V_R;
    vc[b * v_sb + o * v_ss + h * v_sh + c] = vrec[(static_cast<u64>(h) * T + i) * V_R + c];
  }
  if (raw_slot == nullptr) return;
  const int rs = raw_slot[b];
  if (rs < 0 || rs >= ra.num_raw) return;
  for (int j = threadIdx.x; j < h_kv * D; j += blockDim.x) {
    const int h = j / D, c = j - h * D;
    const float kv = load_float<NEW_KIND>(ra.key, static_cast<u64>(i) * ra.kv_st + h * ra.kv_sh + c);
    const float vv = load_float<NEW_KIND>(ra.value, static_cast<u64>(i) * ra.vv_st + h * ra.vv_sh + c);
    store_float<RAW_KIND>(ra.raw_k,
                          static_cast<u64>(rs) * ra.rk_s0 + o * ra.rk_s1 + h * ra.rk_s2 + c, kv);
    store_float<RAW_KIND>(ra.raw_v,
                          static_cast<u64>(rs) * ra.rv_s0 + o * ra.rv_s1 + h * ra.rv_s2 + c, vv);
  }
}
