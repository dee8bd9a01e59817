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
//   tq_paged_prep    grid (rows + raw blocks), up to RAW_THREADS threads. Blocks < rows (= n_dec*h_q):
//                    tq_attn_prep's query preparation (permute by the KV head's key channels, rotate,
//                    fold scale*log2(e), float16 hi+lo). Blocks past them: the RAW partials, one
//                    block per KV stream and part of RAW_PART logical blocks (its new token, part 0,
//                    and every context token whose block has a raw row, float32, original domain,
//                    all GQ heads of the group; the block's warps take the listed tokens in turn
//                    and merge once at the end); they need no other kernel's output. Launched
//                    either as one grid (rows + n_dec*H*parts, RAW_THREADS threads), or, for many
//                    streams, as a rows-only grid (rows threads as the host picks) plus a raws-only
//                    grid (rows = 0) on a side stream forked from the caller's and joined before
//                    tq_paged_reduce, so the raw partials overlap the split instead of delaying it.
//   tq_paged_split   grid (nchunks, n_dec*H), NWARPS warps. Row bh = r*H + h, column c: chunk c covers
//                    tiles [c*NWARPS*TPW, (c+1)*NWARPS*TPW) of the context (a tile = 16 tokens of one
//                    block, BS a multiple of 16): tq_attn_split's maths (tensor-core scores and
//                    values from per-lane pair tables, online softmax per warp, the block's warps
//                    merged into one partial), the records copied in place through the block table.
//                    Tiles whose block is out of range or has a raw row are skipped (no copy, no
//                    work). A raw_slot_of_block entry outside 0 .. num_raw - 1 is no raw row, in
//                    every kernel here (PagedCache's rule): its block is read from its records.
//                    Chunk boundaries are fixed in tokens (NWARPS, TPW compile-time), so a
//                    request's partials, and its output, do not depend on the batch it shares a
//                    launch with; chunks past a request's context exit at once.
//   tq_paged_reduce  grid (n_dec*h_q), block 256: merges the request's chunk partials (rotated
//                    domain) and its raw partials (original domain), un-rotates once, scatters
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
#define RAW_SCAN 2  // block-table entries per thread of a raw partial's part
#endif
#define RAW_PART (RAW_THREADS * RAW_SCAN)  // logical blocks per part of a raw partial
#ifndef RAW_U
#define RAW_U 4  // listed tokens a warp of the raw partial loads at once
#endif

// One part of a KV stream's raw partial for its GQ query rows: m (log2 domain), l and acc[D]
// (original channel order) over its raw-pool context tokens in logical blocks [part * RAW_PART,
// (part + 1) * RAW_PART) and, part 0, its new token; out at [(row * nparts + part)] ([.., D] for
// acc). Part boundaries are fixed in blocks (batch invariance); the parts spread the block-table
// scan (one gather of raw_slot per entry) over several SMs. The part's blocks are listed (prefix
// sums over the block's threads); then warp w
// takes listed tokens w, w + NWARPS, .. RAW_U at a time (all their rows loaded before the first
// use), lane l holding dims [l * D/32, (l + 1) * D/32) of the query rows, of each token's K and V
// row and of its own accumulators (online softmax per warp, no block barrier per token); the
// warps' partials are merged once at the end.
// Shared memory: listed raw rows and lengths [RAW_PART] ints each | warp counts [32]; after the
// tokens, aliased by the merge: acc [NWARPS][GQ][D] | m, l [NWARPS][GQ] floats
// (cupy_paged._raw_smem mirrors this).
__device__ void raw_partial(u8* smem, const RawArgs& a, const void* __restrict__ q, long long q_st,
                            long long q_sh, float scale, const int* __restrict__ bt_row, int nblk, int ctx,
                            const int* __restrict__ raw_slot, int num_blocks, int r, int kvh, int h_kv,
                            int part, int nparts, float* __restrict__ raw_m, float* __restrict__ raw_l,
                            float* __restrict__ raw_acc) {
  constexpr int D = KC::D, NT_ = RAW_THREADS, NW_ = NT_ / 32, DPL = D / 32;
  static_assert(D % 32 == 0, "raw partial: D/32 dims per lane");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int* lrow = reinterpret_cast<int*>(smem);  // listed raw blocks of the current pass
  int* llen = lrow + NT_ * RAW_SCAN;
  int* wcnt = llen + NT_ * RAW_SCAN;

  const u64 row0 = (static_cast<u64>(r) * h_kv + kvh) * GQ;
  float qv[GQ][DPL], m[GQ], l[GQ], acc[GQ][DPL];
#pragma unroll
  for (int g = 0; g < GQ; ++g) {
    m[g] = -TQ_INF;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      qv[g][j] = load_float<IN_KIND>(q, static_cast<u64>(r) * q_st + static_cast<u64>(kvh * GQ + g) * q_sh +
                                            lane * DPL + j) * (scale * LOG2E);
      acc[g][j] = 0.f;
    }
  }

  // Listed tokens [0, ntok) of a pass: the first `extra` (0 or 1) the new token, then BS per listed
  // block (those at or past its length masked).
  auto tokens = [&](int ntok, int extra) {
    for (int t0 = warp; t0 < ntok; t0 += NW_ * RAW_U) {
      float kx[RAW_U][DPL], vx[RAW_U][DPL];
      bool ok[RAW_U];
#pragma unroll
      for (int u = 0; u < RAW_U; ++u) {
        const int t = t0 + u * NW_, x = t - extra, k = x / BS, o = x - k * BS;
        // Warp-uniform: t depends on the warp alone.
        ok[u] = t < ntok && (t < extra || o < llen[k]);
#pragma unroll
        for (int j = 0; j < DPL; ++j) kx[u][j] = vx[u][j] = 0.f;
        if (ok[u] && t < extra) {
#pragma unroll
          for (int j = 0; j < DPL; ++j) {
            kx[u][j] = load_float<NEW_KIND>(a.key, static_cast<u64>(r) * a.kv_st + kvh * a.kv_sh + lane * DPL + j);
            vx[u][j] = load_float<NEW_KIND>(a.value, static_cast<u64>(r) * a.vv_st + kvh * a.vv_sh + lane * DPL + j);
          }
        } else if (ok[u]) {
          const u64 row = static_cast<u64>(lrow[k]);
          load_vec<RAW_KIND, DPL>(a.raw_k, row * a.rk_s0 + o * a.rk_s1 + kvh * a.rk_s2 + lane * DPL, kx[u]);
          load_vec<RAW_KIND, DPL>(a.raw_v, row * a.rv_s0 + o * a.rv_s1 + kvh * a.rv_s2 + lane * DPL, vx[u]);
        }
      }
      float lg[RAW_U][GQ];
#pragma unroll
      for (int u = 0; u < RAW_U; ++u)
#pragma unroll
        for (int g = 0; g < GQ; ++g) {
          float d = 0.f;
#pragma unroll
          for (int j = 0; j < DPL; ++j) d = fmaf(qv[g][j], kx[u][j], d);
          lg[u][g] = d;
        }
#pragma unroll
      for (int o = 16; o; o >>= 1)
#pragma unroll
        for (int u = 0; u < RAW_U; ++u)
#pragma unroll
          for (int g = 0; g < GQ; ++g) lg[u][g] += __shfl_xor_sync(0xffffffffu, lg[u][g], o);
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        float mx = m[g];
#pragma unroll
        for (int u = 0; u < RAW_U; ++u) mx = ok[u] ? fmaxf(mx, lg[u][g]) : mx;
        const float ms = mx == -TQ_INF ? 0.f : mx, alpha = exp2f(m[g] - ms);
        float p[RAW_U], ps = 0.f;
#pragma unroll
        for (int u = 0; u < RAW_U; ++u) {
          p[u] = ok[u] ? exp2f(lg[u][g] - ms) : 0.f;
          ps += p[u];
        }
        l[g] = l[g] * alpha + ps;
        m[g] = mx;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          float x = acc[g][j] * alpha;
#pragma unroll
          for (int u = 0; u < RAW_U; ++u) x = fmaf(p[u], vx[u][j], x);
          acc[g][j] = x;
        }
      }
    }
  };

  // This part's pass over the block table: entries [j0, j0 + RAW_PART) (part 0 also takes the new
  // token, first).
  {
    const int j0 = part * RAW_PART;
    // Thread tid scans entries j0 + i * NT_ + tid (coalesced; all loads in flight at once).
    int rs[RAW_SCAN];
    int cnt = 0;
#pragma unroll
    for (int i = 0; i < RAW_SCAN; ++i) {
      const int lb = j0 + i * NT_ + tid;
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
        const int lb = j0 + i * NT_ + tid;
        lrow[base] = rs[i];
        llen[base] = min(BS, ctx - lb * BS);
        ++base;
      }
    __syncthreads();  // list written
    const int extra = part == 0 ? 1 : 0;
    tokens(extra + total * BS, extra);
  }

  // Merge the warps' partials.
  __syncthreads();  // lists no longer read
  float* macc = reinterpret_cast<float*>(smem);
  float* mm = macc + NW_ * GQ * D;
  float* ml = mm + NW_ * GQ;
#pragma unroll
  for (int g = 0; g < GQ; ++g) {
#pragma unroll
    for (int j = 0; j < DPL; ++j) macc[(warp * GQ + g) * D + lane * DPL + j] = acc[g][j];
    if (lane == 0) {
      mm[warp * GQ + g] = m[g];
      ml[warp * GQ + g] = l[g];
    }
  }
  __syncthreads();
  for (int i = tid; i < GQ * D; i += NT_) {
    const int g = i / D;
    float mx = -TQ_INF;
    for (int w = 0; w < NW_; ++w) mx = fmaxf(mx, mm[w * GQ + g]);
    const float ms = mx == -TQ_INF ? 0.f : mx;
    float x = 0.f;
    for (int w = 0; w < NW_; ++w) x = fmaf(macc[(w * GQ + g) * D + (i - g * D)], exp2f(mm[w * GQ + g] - ms), x);
    raw_acc[((row0 + g) * nparts + part) * D + (i - g * D)] = x;
  }
  if (tid < GQ) {
    float mx = -TQ_INF;
    for (int w = 0; w < NW_; ++w) mx = fmaxf(mx, mm[w * GQ + tid]);
    const float ms = mx == -TQ_INF ? 0.f : mx;
    float x = 0.f;
    for (int w = 0; w < NW_; ++w) x = fmaf(ml[w * GQ + tid], exp2f(mm[w * GQ + tid] - ms), x);
    raw_m[(row0 + tid) * nparts + part] = mx;
    raw_l[(row0 + tid) * nparts + part] = x;
  }
}

// ------------------------------------------------------------------------------------ prep
extern "C" __global__ void __launch_bounds__(RAW_THREADS)
    tq_paged_prep(const void* __restrict__ q, long long q_st, long long q_sh, int h_q,
                  const u16* __restrict__ kch, const float* __restrict__ ktab, float scale,
                  u16* __restrict__ qh, float* __restrict__ qscale, int rows,
                  const int* __restrict__ block_table, int bt_stride, int max_blocks,
                  const int* __restrict__ seq_lens, const int* __restrict__ raw_slot, int num_blocks, int h_kv,
                  int raw_parts, float* __restrict__ raw_m, float* __restrict__ raw_l,
                  float* __restrict__ raw_acc, RAW_PARAMS) {
  // Blocks past the first `rows`: raw_parts parts of a raw partial per KV stream (dynamic shared
  // memory); a part past the request's blocks has nothing to do (the reduce reads none of it).
  if (static_cast<int>(blockIdx.x) >= rows) {
    extern __shared__ __align__(16) u8 dsm[];
    const int bp = blockIdx.x - rows, bh = bp / raw_parts, part = bp - bh * raw_parts;
    const int r = bh / h_kv, kvh = bh - r * h_kv;
    const int ctx = context_len(seq_lens, r, max_blocks * BS), nblk = (ctx + BS - 1) / BS;
    if (part > 0 && part * RAW_PART >= nblk) return;
    raw_partial(dsm, RAW_ARGS, q, q_st, q_sh, scale, block_table + static_cast<long long>(r) * bt_stride, nblk,
                ctx, raw_slot, num_blocks, r, kvh, h_kv, part, raw_parts, raw_m, raw_l, raw_acc);
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
                   int num_raw, int h_kv, const u16* __restrict__ qh, const float* __restrict__ qscale,
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
  // raw row: raw_slot outside 0 .. num_raw - 1, as the raw partial reads it), and the addresses of
  // its K and V spans.
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
    ok = b >= 0 && b < num_blocks && (raw_slot == nullptr || raw_slot[b] < 0 || raw_slot[b] >= num_raw);
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
// Dynamic shared memory (floats): w[nchunks] | y[VQD] | z[D] | red[32] | yw[nwarps][VQD] | ra[D].
extern "C" __global__ void tq_paged_reduce(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                           const float* __restrict__ part_acc, int nchunks,
                                           const float* __restrict__ raw_m, const float* __restrict__ raw_l,
                                           const float* __restrict__ raw_acc, int raw_parts,
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
  float* ra = yw + (blockDim.x >> 5) * VQD;
  const int row = blockIdx.x, bh = row / GQ, h = row % GQ;
  const int r = row / h_q, kvh = (row % h_q) / GQ;
  const int ctx = context_len(seq_lens, r, max_tokens);
  const int nparts = ((ctx + TILE - 1) / TILE + NWARPS * TPW - 1) / (NWARPS * TPW);
  const u64 prow0 = static_cast<u64>(bh) * nchunks * GQ + h;

  // The request's raw parts (as tq_paged_prep splits them) merged first, into one raw partial
  // (m: rm; l: rl, every thread; acc: ra[D], original channel order), before anything waits on
  // the chunk partials: their loads are the first the kernel issues.
  const int rparts = max(1, ((ctx + BS - 1) / BS + RAW_PART - 1) / RAW_PART);
  const u64 rrow = static_cast<u64>(row) * raw_parts;
  float rm = -TQ_INF;
  for (int p = 0; p < rparts; ++p) rm = fmaxf(rm, raw_m[rrow + p]);
  const float rms = rm == -TQ_INF ? 0.f : rm;
  float rl = 0.f;
  for (int p = 0; p < rparts; ++p) rl = fmaf(exp2f(raw_m[rrow + p] - rms), raw_l[rrow + p], rl);
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float a = 0.f;
    for (int p = 0; p < rparts; ++p) a = fmaf(exp2f(raw_m[rrow + p] - rms), raw_acc[(rrow + p) * D + c], a);
    ra[c] = a;  // read after merge_partials' barriers
  }
  // The chunk partials' max joins the raw partial's.
  const Merged mg = merge_partials(part_m, part_l, part_acc, nparts, prow0, rm, w, y, yw, red);
  const float wr = exp2f(rms - mg.Ms);
  const float L = mg.L + wr * rl;
  __syncthreads();

  const float invL = 1.f / L;
  const u64 obase = static_cast<u64>(r) * o_st + static_cast<u64>(row % h_q) * o_sh;
  unrotate_values(vtab, y, z, [&](int pos, float a) {
    const int ch = vch ? min(static_cast<int>(vch[kvh * D + pos]), D - 1) : pos;
    store_float<OUT_KIND>(out, obase + ch, (a + wr * ra[ch]) * invL);
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
