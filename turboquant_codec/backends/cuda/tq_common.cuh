// Shared device helpers of the TurboQuant CuPy RawModule kernels (tq_codec.cu, tq_attention.cu).
//
// Owns: the compile-time description of a codec's byte record (macros X_* per codec, see
// turboquant_codec/backends/cupy_raw_build.py::codec_macros), bit extraction from LSB-first code streams,
// float16 / bfloat16 conversions and the m16n8k16 tensor-core wrapper. No standard headers: NVRTC has none,
// so fixed-width types and conversions are spelled out here (inline PTX).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Input dtype codes (macro IN_KIND / TAIL_KIND): why a code and not a template type: float16 and
// bfloat16 arrive as raw 16-bit words, converted here without cuda_fp16.h.
#define TQ_F32 0
#define TQ_F16 1
#define TQ_BF16 2

// NVRTC has no math.h: +infinity spelled out.
#define TQ_INF __int_as_float(0x7f800000)

template <int I>
struct Int {
  static constexpr int value = I;
};

// Compile-time loop: fn(Int<I>{}) for I in [B, E), so per-field constants fold into immediates.
template <int B, int E, class Fn>
__device__ __forceinline__ void static_for(Fn&& fn) {
  if constexpr (B < E) {
    fn(Int<B>{});
    static_for<B + 1, E>(fn);
  }
}

__device__ __forceinline__ float h2f(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ u16 f2h(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// bfloat16 bits of a non-negative float32 (finite or inf), rounded to nearest even. Integer
// arithmetic, so any architecture gets the same bits (cvt.rn.bf16.f32 needs sm_80).
__device__ __forceinline__ u16 f2bf(float f) {
  const u32 u = __float_as_uint(f);
  return static_cast<u16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The same from float64 in one rounding, as ml_dtypes' astype(bfloat16) rounds the reference's
// norms: to float32 toward zero with the lost bits ORed into its last bit (round to odd, exact
// for any later rounding to 8 significant bits), then as f2bf. (cvt.rn.bf16.f64 needs sm_90.)
__device__ __forceinline__ u16 d2bf(double d) {
  float f;
  asm("cvt.rz.f32.f64 %0, %1;" : "=f"(f) : "d"(d));
  return f2bf(__uint_as_float(__float_as_uint(f) | (static_cast<double>(f) != d ? 1u : 0u)));
}

// Two floats to a half2 register: lo in bits 0-15 (the lower k index of an mma fragment).
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// Two bfloat16 products at once, rounded to nearest even (fma with -0: a product of +-0 keeps its
// sign; mul.bf16x2 needs sm_90).
__device__ __forceinline__ u32 bf16x2_mul(u32 a, u32 b) {
  u32 r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
  return r;
}

template <int KIND>
__device__ __forceinline__ float load_float(const void* p, u64 i) {
  if constexpr (KIND == TQ_F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (KIND == TQ_F16) {
    return h2f(static_cast<const u16*>(p)[i]);
  } else {
    return __uint_as_float(static_cast<u32>(static_cast<const u16*>(p)[i]) << 16);
  }
}

// v stored as element i of a KIND array (bfloat16: round to nearest even).
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

// N consecutive KIND values at element e of p -> floats, in loads of the widest unit (2 to 16
// bytes) that divides their N * size bytes (the address aligned to it).
template <int KIND, int N>
__device__ __forceinline__ void load_vec(const void* p, u64 e, float (&out)[N]) {
  constexpr int ES = KIND == TQ_F32 ? 4 : 2, BYTES = N * ES;
  constexpr int CB = BYTES % 16 == 0 ? 16 : BYTES % 8 == 0 ? 8 : BYTES % 4 == 0 ? 4 : 2;
  const u8* a = static_cast<const u8*>(p) + e * ES;
  u32 w[(BYTES + 3) / 4];
#pragma unroll
  for (int c = 0; c < BYTES / CB; ++c) {
    if constexpr (CB == 16) {
      const uint4 x = reinterpret_cast<const uint4*>(a)[c];
      w[4 * c] = x.x, w[4 * c + 1] = x.y, w[4 * c + 2] = x.z, w[4 * c + 3] = x.w;
    } else if constexpr (CB == 8) {
      const uint2 x = reinterpret_cast<const uint2*>(a)[c];
      w[2 * c] = x.x, w[2 * c + 1] = x.y;
    } else if constexpr (CB == 4) {
      w[c] = reinterpret_cast<const u32*>(a)[c];
    } else {
      const u32 h = reinterpret_cast<const u16*>(a)[c];
      w[c / 2] = c % 2 ? w[c / 2] | h << 16 : h;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (KIND == TQ_F32) {
      out[i] = __uint_as_float(w[i]);
    } else {
      const u32 h = w[i / 2] >> (16 * (i % 2)) & 0xffffu;
      out[i] = KIND == TQ_F16 ? h2f(static_cast<u16>(h)) : __uint_as_float(h << 16);
    }
  }
}

// bfloat16 norm stored at byte offset `off` of a record (records and norm offsets are 2-byte
// aligned).
__device__ __forceinline__ float rec_norm(const u8* rec, int off) {
  return __uint_as_float(static_cast<u32>(*reinterpret_cast<const u16*>(rec + off)) << 16);
}

// Bits [pos, pos+len) of an LSB-first stream held in words w[] (pos, len <= 32 compile-time; one
// funnel shift covers a span straddling two words, w[W + 1] is read only then).
template <int POS, int LEN>
__device__ __forceinline__ u32 bits_at(const u32* w) {
  constexpr int W = POS >> 5, O = POS & 31;
  u32 v;
  if constexpr (O + LEN <= 32) v = w[W] >> O;
  else v = __funnelshift_r(w[W], w[W + 1], O);
  if constexpr (LEN == 32) return v;
  else return v & ((1u << LEN) - 1u);
}

// NW words of a bit stream starting at run-time bit `start` of a 4-byte aligned record,
// realigned so bit 0 of out[0] is bit `start`. Reads one word past the span (buffers are padded).
template <int NW>
__device__ __forceinline__ void load_stream(const u8* rec, int start, u32 (&out)[NW]) {
  const u32* p = reinterpret_cast<const u32*>(rec) + (start >> 5);
  const int sh = start & 31;
  u32 raw[NW + 1];
#pragma unroll
  for (int k = 0; k <= NW; ++k) raw[k] = p[k];
#pragma unroll
  for (int k = 0; k < NW; ++k) out[k] = __funnelshift_r(raw[k], raw[k + 1], sh);
}

// Generic (run-time position) bit read for the simple kernels: code i of width `bits`.
__device__ __forceinline__ u32 code_at(const u8* rec, int bitpos, int bits) {
  u32 v = 0;
  for (int k = 0; k < bits; ++k) {
    const int p = bitpos + k;
    v |= ((rec[p >> 3] >> (p & 7)) & 1u) << k;
  }
  return v;
}

// Bits [pos, pos+len) of an LSB-first stream, already shifted left by SH (the byte stride of one
// entry of a per-lane replicated table is 32 lanes x 2^(SH-5) bytes), so that a table address is
// one OR with the lane's byte offset: two ALU ops per lookup instead of extract, scale, add.
template <int POS, int LEN, int SH>
__device__ __forceinline__ u32 bits_scaled(const u32* w) {
  constexpr int W = POS >> 5, O = POS & 31;
  constexpr u32 MASK = ((1u << LEN) - 1u) << SH;
  if constexpr (O + LEN <= 32) {
    if constexpr (O >= SH) return (w[W] >> (O - SH)) & MASK;
    else return (w[W] << (SH - O)) & MASK;
  } else {
    return __funnelshift_r(w[W], w[W + 1], O - SH) & MASK;
  }
}

// Shared-memory words at byte offset `off` of `base` (per-lane table lookups).
__device__ __forceinline__ u32 lds_at(const u32* base, u32 off) {
  return *reinterpret_cast<const u32*>(reinterpret_cast<const u8*>(base) + off);
}

// Interleave the B-bit codes of two streams a, b into 2B-bit pair indices (a code in the low
// half): even = pairs of codes 0, 2, 4, ... and odd = pairs of codes 1, 3, 5, ..., field k at bit
// 2kB. One shift and one bit-select (LOP3) each, for up to 32/B codes at a time.
__host__ __device__ constexpr u32 even_fields_mask(int b) {
  u32 m = 0;
  for (int k = 0; 2 * k * b < 32; ++k) m |= ((1u << b) - 1u) << (2 * k * b);
  return m;
}
template <int B>
__device__ __forceinline__ void pair_codes(u32 a, u32 b, u32& even, u32& odd) {
  constexpr u32 M = even_fields_mask(B);
  even = (a & M) | ((b << B) & ~M);
  odd = ((a >> B) & M) | (b & ~M);
}

// Transpose an 8x8 matrix of 16-bit values held as mma fragments (lane: row lane/4, columns
// 2(lane%4), +1): turns a score accumulator row into the B operand of the next product in
// registers, without a round trip through shared memory.
__device__ __forceinline__ u32 transpose8x8(u32 x) {
  u32 r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// D(16x8, f32) += A(16x16, row) * B(16x8, col), both float16 (BF16 = false) or bfloat16.
template <bool BF16 = false>
__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                         u32 b1) {
  if constexpr (BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// 16-byte global->shared copy to a shared-space address (smem_addr); bytes past `src_bytes` (0..16)
// are zero-filled.
__device__ __forceinline__ void cp_async16_shared(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// The same at a generic pointer into shared memory.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  cp_async16_shared(smem_addr(dst), src, src_bytes);
}
// The whole 16 bytes, no bounds check.
__device__ __forceinline__ void cp_async16_full(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ------------------------------------------------------------------------------------ codec fields
// A codec X (X = C for the codec kernels, K / V for attention) is described by macros:
//   X_D, X_R (record bytes), X_NG (1 or 2 groups), X_QJL (0/1),
//   X_G{0,1}_DIM, _BITS (code bits), _CODE (byte offset), _SIGN (byte offset), _NORM (byte offset),
//   _QJL (float: sqrt(pi/2)/dim), _ROT/_ROTT/_PROJ/_PROJT/_CENT/_BND (offsets into its float table).
// TQ_CODEC(Name, X) turns them into a struct of compile-time accessors, so templated device code
// serves every codec. A "field" is one coded stream of a group: its Lloyd-Max codes, or (prod) its
// QJL signs. Fields come group by group, codes before signs; their dims concatenate to fdims().
#define TQ_HD __host__ __device__ static constexpr
#define TQ_CODEC(NAME, X)                                                                       \
  struct NAME {                                                                                 \
    static constexpr int D = X##_D;                                                                        \
    static constexpr int R = X##_R;                                                                        \
    static constexpr int NG = X##_NG;                                                                      \
    static constexpr int QJL = X##_QJL;                                                                    \
    TQ_HD int gdim(int g) { return g == 0 ? X##_G0_DIM : X##_G1_DIM; }                          \
    TQ_HD int gstart(int g) { return g == 0 ? 0 : X##_G0_DIM; }                                 \
    TQ_HD int gbits(int g) { return g == 0 ? X##_G0_BITS : X##_G1_BITS; }                       \
    TQ_HD int gcode(int g) { return g == 0 ? X##_G0_CODE : X##_G1_CODE; }                       \
    TQ_HD int gsign(int g) { return g == 0 ? X##_G0_SIGN : X##_G1_SIGN; }                       \
    TQ_HD int gnorm(int g) { return g == 0 ? X##_G0_NORM : X##_G1_NORM; }                       \
    TQ_HD float gqjl(int g) { return g == 0 ? X##_G0_QJL : X##_G1_QJL; }                        \
    /* 1/s of the group's scaled float16 centroid table (attention pair tables) */              \
    TQ_HD float gcs(int g) { return g == 0 ? X##_G0_CS : X##_G1_CS; }                           \
    TQ_HD int grot(int g) { return g == 0 ? X##_G0_ROT : X##_G1_ROT; }                          \
    TQ_HD int grott(int g) { return g == 0 ? X##_G0_ROTT : X##_G1_ROTT; }                       \
    TQ_HD int gproj(int g) { return g == 0 ? X##_G0_PROJ : X##_G1_PROJ; }                       \
    TQ_HD int gprojt(int g) { return g == 0 ? X##_G0_PROJT : X##_G1_PROJT; }                    \
    TQ_HD int gcent(int g) { return g == 0 ? X##_G0_CENT : X##_G1_CENT; }                       \
    TQ_HD int gbnd(int g) { return g == 0 ? X##_G0_BND : X##_G1_BND; }                          \
    TQ_HD int nf() { return NG * (1 + QJL); }                                                   \
    TQ_HD int fgroup(int f) { return f / (1 + QJL); }                                           \
    TQ_HD bool fsign(int f) { return QJL && (f % 2 == 1); }                                     \
    TQ_HD int fdim(int f) { return gdim(fgroup(f)); }                                           \
    TQ_HD int fbits(int f) { return fsign(f) ? 1 : gbits(fgroup(f)); }                          \
    TQ_HD int fbitoff(int f) { return 8 * (fsign(f) ? gsign(fgroup(f)) : gcode(fgroup(f))); }   \
    /* byte offset of the norm scaling the field: |x_g|, or the residual norm for signs */      \
    TQ_HD int fscale(int f) { return gnorm(fgroup(f)) + (fsign(f) ? 2 : 0); }                   \
    TQ_HD float ffactor(int f) { return fsign(f) ? gqjl(fgroup(f)) : 1.0f; }                    \
    /* the same for the attention kernel, whose code tables hold s * centroid */                \
    TQ_HD float pfactor(int f) { return fsign(f) ? gqjl(fgroup(f)) : gcs(fgroup(f)); }          \
    TQ_HD int foff(int f) { return f == 0 ? 0 : foff(f - 1) + fdim(f - 1); }                    \
    TQ_HD int fdims() { return foff(nf()); }                                                    \
    /* pair table of a field: 2**(2 bits) entries (two codes -> two float16 values) */          \
    TQ_HD int flut(int f) { return f == 0 ? 0 : flut(f - 1) + (1 << (2 * fbits(f - 1))); }      \
    TQ_HD int lutn() { return flut(nf()); }                                                     \
  };

// Calls f(Int<g>, i) for every row i of every channel group g, the rows of all groups spread over
// the block's threads at once (position gstart(g) + i goes to thread position % blockDim.x).
template <class Cd, class F>
__device__ __forceinline__ void for_group_rows(F f) {
  for (int p = threadIdx.x; p < Cd::D; p += blockDim.x)
    static_for<0, Cd::NG>([&](auto gi) {
      constexpr int g = decltype(gi)::value;
      if (p >= Cd::gstart(g) && p < Cd::gstart(g) + Cd::gdim(g)) f(gi, p - Cd::gstart(g));
    });
}

// sum_j mt[j * G + i] * x[j]: row i of M x for a G x G matrix M stored transposed (consecutive
// threads read consecutive words). Unrolled so that 32 loads of the L2-resident table are in
// flight per thread: a rolled loop waits out the L2 latency once per term.
template <int G>
__device__ __forceinline__ float dot_column(const float* __restrict__ mt, const float* x, int i) {
  float a = 0.f;
#pragma unroll 32
  for (int j = 0; j < G; ++j) a = fmaf(mt[j * G + i], x[j], a);
  return a;
}

// Rotate (and for prod project) one vector already in record channel order:
// out[foff(code field of g) + i] = sum_j rot[i][j] x[gstart(g) + j]  (rotation @ x_g), and
// out[foff(sign field of g) + i] = sum_j proj[i][j] out_code[j]     (S @ rotated).
template <class Cd>
__device__ void rotate_fields(const float* __restrict__ tab, const float* x, float* out) {
  for_group_rows<Cd>([&](auto gi, int i) {
    constexpr int g = decltype(gi)::value, G = Cd::gdim(g), fc = g * (1 + Cd::QJL);
    out[Cd::foff(fc) + i] = dot_column<G>(tab + Cd::grott(g), x + Cd::gstart(g), i);
  });
  if constexpr (Cd::QJL) {
    __syncthreads();
    for_group_rows<Cd>([&](auto gi, int i) {
      constexpr int g = decltype(gi)::value, G = Cd::gdim(g), fc = g * (1 + Cd::QJL);
      out[Cd::foff(fc + 1) + i] = dot_column<G>(tab + Cd::gprojt(g), out + Cd::foff(fc), i);
    });
  }
  __syncthreads();
}
