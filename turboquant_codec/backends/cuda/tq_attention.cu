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
// Fragment and pair-table layouts, precision: tq_attn_common.cuh (shared with tq_paged.cu).
#include "tq_common.cuh"

TQ_CODEC(KC, K)
TQ_CODEC(VC, V)

#include "tq_attn_common.cuh"

#ifndef NWARPS
#define NWARPS 4  // warps per block; each is independent (own tiles, own partial)
#endif
#ifndef MINBLOCKS
#define MINBLOCKS 1  // resident blocks per SM the register allocation must allow
#endif
#ifndef STAGES
#define STAGES 4  // cp.async ring depth per warp: ~4 KB in flight per warp hides DRAM latency
#endif
#define TILE_BYTES_K (TILE * K_R + 32)  // + 16 B misalignment slack + 16 B over-read padding
#define TILE_BYTES_V (TILE * V_R + 32)
#define STAGE_BYTES (((TILE_BYTES_K + TILE_BYTES_V) + 15) / 16 * 16)

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
    qp[i] = kch ? qo[min(static_cast<int>(kch[static_cast<u64>(stream) * D + i]), D - 1)] : qo[i];
  __syncthreads();
  prep_query(ktab, qp, qf, red, scale, row, qh, qscale);
}

// ------------------------------------------------------------------------------------ split
extern "C" __global__ void __launch_bounds__(NWARPS * 32, MINBLOCKS)
    tq_attn_split(const u8* __restrict__ krec, const u8* __restrict__ vrec,
                  const u16* __restrict__ qh, const float* __restrict__ qscale,
                  const u32* __restrict__ klutv, const u32* __restrict__ vlutv,
                  float* __restrict__ part_m, float* __restrict__ part_l,
                  float* __restrict__ part_acc, int n, int tiles_per_warp, int nparts) {
  extern __shared__ __align__(16) u8 smem[];
  // Pair tables, then the warps' rings; after the main loop the whole buffer is reused for the
  // block's merge (cupy_raw_attn.merge_layout).
  u32 *klut, *vlut;
  u8* ring_all = load_tables<NWARPS>(smem, klutv, vlutv, klut, vlut);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bh = blockIdx.y;
  // Warps past the last partial run no tiles but still join the block's merge.
  const int p = blockIdx.x * NWARPS + warp;
  const int ntiles = (n + TILE - 1) / TILE;
  const int tile0 = p * tiles_per_warp;
  const int my_tiles = p < nparts ? max(0, min(tiles_per_warp, ntiles - tile0)) : 0;
  u8* ring = ring_all + warp * (STAGES * STAGE_BYTES);
  WarpAttn wa(klut, vlut, qh, qscale, bh);

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
  ring_loop<STAGES>(my_tiles, issue, [&](int it) {
    const u8* st = ring + (it % STAGES) * STAGE_BYTES;
    const int left = n - (tile0 + it) * TILE;  // tokens of the stream from this tile on
    wa.tile<K_R, V_R>(st + ks.mis, st + TILE_BYTES_K + vs.mis, left);
  });
  // One partial per head: rows (bh, blockIdx.x, head).
  wa.merge<NWARPS>(smem, (static_cast<u64>(bh) * gridDim.x + blockIdx.x) * GQ, part_m, part_l, part_acc);
}

// ------------------------------------------------------------------------------------ reduce
// Dynamic shared memory: w[nparts] | y[VQD] | z[D] | tail acc[D] | q[D] | logits[32] | red[32] |
// per-warp partial sums yw[nwarps][VQD]. Partials: one per split block (merge_partials).
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

  const Merged mg = merge_partials(part_m, part_l, part_acc, nparts, prow0, -TQ_INF, w, y, yw, red);
  float M = mg.M, L = mg.L;
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

  // Rotated domain -> record channel order, scattered through the value channels.
  const float invL = 1.f / L;
  unrotate_values(vtab, y, z, [&](int pos, float a) {
    const int ch = vch ? min(static_cast<int>(vch[static_cast<u64>(bh) * D + pos]), D - 1) : pos;
    out[static_cast<u64>(row) * D + ch] = (a + ta[ch]) * invL;
  });
}
