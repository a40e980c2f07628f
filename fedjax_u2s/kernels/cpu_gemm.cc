// XLA:CPU custom calls for float32 decoding: FedjaxU2sCpuGemm, (batched)
// matrix products; FedjaxU2sCpuPackedGemm, products with a weight packed
// into column panels (and SwiGLU's pair), and FedjaxU2sCpuQuantGemm, the
// same with the panels in a GGUF block format; FedjaxU2sCpuAttention, attention
// of a few query rows over a KV cache. The first is described here, the
// others at their sections below.
//
// Products of up to kSmallM rows (decoding: M is the batch size, or a few
// query rows in attention) run through the streaming loops below, which read
// each weight once from memory; larger ones through a CBLAS sgemm. The sgemm
// is not linked here: Python resolves it (ctypes, from the `mkl` wheel) and
// hands its address to fedjax_u2s_set_sgemm, so this file compiles against
// nothing but XLA's header-only FFI API. Measurements: docs/benchmarks.md,
// "Decoding kernels".
//
// Operands are row-major with equal rank >= 2: a [..., M, K] (or [..., K, M]
// with transpose_a), b [..., K, N] (or [..., N, K] with transpose_b), out
// [..., M, N]. Each leading (batch) dim of a and b is either equal or 1 (a
// broadcast, as jax.vmap's "expand_dims" produces for an unbatched operand).
// When b is shared by the whole batch and a is not transposed, the batch is
// folded into M: one large product instead of many small ones.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <functional>
#include <memory>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c,
// ldc) with CBLAS's LP64 int arguments.
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int,
                         const float*, int, float, float*, int);
SgemmFn g_sgemm = nullptr;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// One product of the batch, split into `blocks` row (or column) blocks of the
// output so XLA's own intra-op threads share it. The sgemm itself runs
// single-threaded (Python selects MKL's sequential layer): a second thread
// pool (OpenMP) would fight XLA's for the same cores.
struct Problem {
  const float* a;
  const float* b;
  float* c;
  int64_t m, n, k, lda, ldb;
  bool ta, tb;
};

// ---------------------------------------------------------------------------
// Few rows (decoding: M = batch size): a kernel that streams the weight once.
//
// sgemm packs b into panels on every call; with a few rows of a that packing
// is much of the work, and each call streams a weight that is not in cache
// (a decode step reads every weight of the model once). These loops keep a
// kNnRows x kNnBlock tile of the output in registers and read each weight
// element once from memory (later rows of a re-read it from L1/L2), with
// software prefetch ahead: faster than MKL's sgemm and XLA's dot on cold
// weights, though memory time is not all hidden yet (docs/benchmarks.md,
// "Decoding kernels", has the timings). GCC's vector extensions map one
// vector type to the widest registers -march=native has.

#if defined(__AVX512F__)
constexpr int kVl = 16;  // floats per vector register
constexpr int kNnRows = 6, kNnVecs = 4;  // 24 accumulators of 32 registers
constexpr int kNtRows = 4, kNtCols = 4;
#elif defined(__AVX__)
constexpr int kVl = 8;
constexpr int kNnRows = 6, kNnVecs = 2;  // 12 accumulators of 16 registers
constexpr int kNtRows = 2, kNtCols = 4;
#else
constexpr int kVl = 4;
constexpr int kNnRows = 4, kNnVecs = 2;
constexpr int kNtRows = 2, kNtCols = 4;
#endif
typedef float Vec __attribute__((vector_size(kVl * sizeof(float))));
constexpr int64_t kSmallM = 32;  // Up to this many rows, stream (see RunBlock).
constexpr int64_t kNnBlock = kNnVecs * kVl;  // Output columns per NN tile.
// NN: rows of b per pass; the tile of b (kKBlock x kNnBlock) stays in L2
// while the rows of a go over it.
constexpr int64_t kKBlock = 1024;
// Software prefetch distances, chosen by measurement (docs/benchmarks.md):
// NN, rows of b ahead (its rows lie a whole row apart, where hardware
// prefetchers do not follow); NT, tiles of b ahead.
constexpr int64_t kPrefetchRows = 32;
constexpr int64_t kPrefetchTiles = 2;

inline Vec Load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(v)); }
// x in every lane. Written as x - 0, which is x for every x (x + 0 is not,
// for x = -0), so GCC emits one broadcast (from memory where x is loaded);
// `Vec{} + x` cost a scalar add on the FMA ports and a register broadcast
// per row, which held the panel loop well below the core's peak.
inline Vec Splat(float x) { return x - Vec{}; }

// c[0:R, 0:V*kVl] (+= with accumulate) a[0:R, 0:kn] b[0:kn, 0:V*kVl]; b
// row-major with ldb floats per row (a packed panel: ldb = kPanel).
template <int R, int V = kNnVecs>
void TileNn(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
            int64_t ldc, int64_t kn, bool accumulate) {
  Vec acc[R][V];
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < V; ++j) {
      acc[i][j] = accumulate ? Load(c + i * ldc + j * kVl) : Vec{};
    }
  }
  for (int64_t k = 0; k < kn; ++k) {
    for (int64_t j = 0; j < V * kVl; j += 64 / sizeof(float)) {  // Lines.
      __builtin_prefetch(b + (k + kPrefetchRows) * ldb + j);
    }
    Vec bv[V];
    for (int j = 0; j < V; ++j) bv[j] = Load(b + k * ldb + j * kVl);
    for (int i = 0; i < R; ++i) {
      const Vec ai = Splat(a[i * lda + k]);
      for (int j = 0; j < V; ++j) acc[i][j] += ai * bv[j];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < V; ++j) Store(c + i * ldc + j * kVl, acc[i][j]);
  }
}

// TileNn over the first r (r <= R) rows.
template <int R, int V = kNnVecs>
void TileNnRows(int64_t r, const float* a, int64_t lda, const float* b,
                int64_t ldb, float* c, int64_t ldc, int64_t kn, bool accumulate) {
  if constexpr (R > 1) {
    if (r < R) return TileNnRows<R - 1, V>(r, a, lda, b, ldb, c, ldc, kn, accumulate);
  }
  TileNn<R, V>(a, lda, b, ldb, c, ldc, kn, accumulate);
}

// c[m0:m1, n0:n1] = a[m0:m1, :] b[:, n0:n1] with b [K, N] row-major.
void StreamNn(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t tiled = n0 + (n1 - n0) / kNnBlock * kNnBlock;
  for (int64_t k0 = 0; k0 < p.k; k0 += kKBlock) {
    const int64_t k1 = std::min(k0 + kKBlock, p.k);
    for (int64_t n = n0; n < tiled; n += kNnBlock) {
      for (int64_t m = m0; m < m1; m += kNnRows) {
        TileNnRows<kNnRows>(m1 - m, p.a + m * p.lda + k0, p.lda,
                            p.b + k0 * p.ldb + n, p.ldb, p.c + m * p.n + n, p.n,
                            k1 - k0, k0 != 0);
      }
    }
  }
  for (int64_t m = m0; m < m1; ++m) {  // Columns past the last whole tile.
    for (int64_t n = tiled; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < p.k; ++k) s += p.a[m * p.lda + k] * p.b[k * p.ldb + n];
      p.c[m * p.n + n] = s;
    }
  }
}

inline float Sum(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256 x = reinterpret_cast<__m256>(v);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#else
  float s = 0.0f;
  for (int l = 0; l < kVl; ++l) s += v[l];
  return s;
#endif
}

// c[0:R, 0:C] = a[0:R, :] b[0:C, :]^T with b [N, K] row-major.
template <int R, int C>
void TileNt(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
            int64_t ldc, int64_t k) {
  Vec acc[R][C] = {};
  const int64_t kv = k / kVl * kVl;
  for (int64_t x = 0; x < kv; x += kVl) {
    for (int j = 0; j < C; ++j) {
      __builtin_prefetch(b + (j + kPrefetchTiles * C) * ldb + x);
    }
    Vec bv[C];
    for (int j = 0; j < C; ++j) bv[j] = Load(b + j * ldb + x);
    for (int i = 0; i < R; ++i) {
      const Vec ai = Load(a + i * lda + x);
      for (int j = 0; j < C; ++j) acc[i][j] += ai * bv[j];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) {
      float s = Sum(acc[i][j]);
      for (int64_t x = kv; x < k; ++x) s += a[i * lda + x] * b[j * ldb + x];
      c[i * ldc + j] = s;
    }
  }
}

template <int R, int C>
void TileNtDispatch(int64_t r, int64_t cols, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k) {
  if constexpr (R > 1) {
    if (r < R) return TileNtDispatch<R - 1, C>(r, cols, a, lda, b, ldb, c, ldc, k);
  }
  if constexpr (C > 1) {
    if (cols < C) return TileNtDispatch<R, C - 1>(r, cols, a, lda, b, ldb, c, ldc, k);
  }
  TileNt<R, C>(a, lda, b, ldb, c, ldc, k);
}

// c[m0:m1, n0:n1] = a[m0:m1, :] b[n0:n1, :]^T with b [N, K] row-major: each
// row of b is read once, contiguously, for every row of a.
void StreamNt(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kNtCols) {
    for (int64_t m = m0; m < m1; m += kNtRows) {
      TileNtDispatch<kNtRows, kNtCols>(m1 - m, n1 - n, p.a + m * p.lda, p.lda,
                                       p.b + n * p.ldb, p.ldb, p.c + m * p.n + n,
                                       p.n, p.k);
    }
  }
}

typedef int32_t IVec __attribute__((vector_size(kVl * sizeof(int32_t))));

// exp(x), x clamped to [-87, 88] (the normal float range): Cody-Waite range
// reduction to r in [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes'
// expf coefficients, ~1 ulp), scaled by 2^n through the exponent bits.
inline Vec Exp(Vec x) {
  const Vec lo = Vec{} - 87.0f, hi = Vec{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec magic = Vec{} + 12582912.0f;  // 1.5 * 2^23: rounds to integer.
  const Vec n = (x * 1.44269504088896341f + magic) - magic;
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec y = p * r * r + r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// ---------------------------------------------------------------------------
// Prepacked weights (decoding). A [K, N] weight laid out as kPanel-column
// panels, [ceil(N / kPanel), K, kPanel] (the last one zero-padded), so each
// panel is one contiguous stream: hardware prefetchers follow it and it
// spans few pages, where a kNnBlock-wide tile of a row-major weight reads
// one short piece per row, each a whole row (often a page) apart: less time
// per decode step (docs/benchmarks.md, "Decoding kernels"). The panel
// width is fixed (not per ISA): the layout is made by the caller (JAX).

constexpr int64_t kPanel = 32;
constexpr int kPkVecs = kPanel / kVl;
#if defined(__AVX512F__)
constexpr int kPkRows = 12;  // 24 accumulators, 2 weight vectors, 1 broadcast
#elif defined(__AVX__)
constexpr int kPkRows = 3;   // 12 accumulators of 16 registers
#else
constexpr int kPkRows = 1;
#endif

// Panels may also hold the weight in one of GGUF's block formats, for a
// weight whose float32 values are exactly such a format's dequantisation
// (a model loaded from a quantized GGUF): the decode steps then read 6.4x
// (Q4_1) or 3.8x (Q8_0) fewer bytes and the products are the same float32
// products, of the same weights. A panel is K / kQRows blocks, each kQRows
// rows of K by the panel's kPanel columns, with one scale per column:
//   Q4_1: kPanel float16 scales d, kPanel float16 minimums m, then kQRows
//     rows of kPanel / 2 bytes, byte c holding column c's 4-bit q in its low
//     nibble and column c + kPanel / 2's in its high one: w = d q + m.
//   Q8_0: kPanel float16 scales d, then kQRows rows of kPanel int8 q: w = d q.
// d q is exact in float32 (11-bit by at most 8-bit significands), so these
// are bit for bit the values GGUF's dequantisation (d * q + m) gives. The
// kernel expands kQChunk rows at a time into an L1 tile for the float32
// loops.
enum Format : int32_t { kF32 = 0, kQ4_1 = 1, kQ8_0 = 2 };
constexpr int64_t kQRows = 32;
constexpr int64_t kQChunk = 128;  // 16 KiB of float32 panel rows.

int64_t BlockBytes(int32_t format) {
  return format == kQ4_1 ? 2 * 2 * kPanel + kQRows * kPanel / 2
                         : 2 * kPanel + kQRows * kPanel;
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // Zero or subnormal: man * 2^-24.
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

// float32 -> float16 bits, rounding to nearest even (as numpy's astype).
inline uint16_t FloatToHalf(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0);
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520: rounds to inf.
  if (x < 0x38800000u) {  // Below 2^-14: a multiple of 2^-24 (or 2^-14).
    float a;
    __builtin_memcpy(&a, &x, sizeof(a));
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  uint32_t h = (x - 0x38000000u) >> 13;  // Rebias 127 -> 15, 23 -> 10 bits.
  const uint32_t rest = x & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;  // May carry: fine.
  return static_cast<uint16_t>(sign | h);
}

// One block to float32, kQRows rows of kPanel floats at out.
void DequantBlock(int32_t format, const uint8_t* block, float* out) {
#if defined(__AVX512F__)
  // A row of 32 columns is two vectors; GCC does not vectorise the portable
  // loops below (nibble split, int8 widening), which made the products
  // slower than float32 panels' on the dev VM.
  static_assert(kPanel == 2 * kVl);
  auto half = [&](int64_t at) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + at)));
  };
  const __m512 d0 = half(0), d1 = half(2 * kVl);
  if (format == kQ4_1) {
    const __m512 m0 = half(2 * kPanel), m1 = half(2 * kPanel + 2 * kVl);
    const __m512i low = _mm512_set1_epi32(15);
    const uint8_t* q = block + 4 * kPanel;
    for (int64_t r = 0; r < kQRows; ++r, q += kPanel / 2, out += kPanel) {
      const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      _mm512_storeu_ps(out, _mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(_mm512_and_si512(x, low)), m0));
      _mm512_storeu_ps(out + kVl, _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4)), m1));
    }
  } else {
    const uint8_t* q = block + 2 * kPanel;
    for (int64_t r = 0; r < kQRows; ++r, q += kPanel, out += kPanel) {
      const __m128i* row = reinterpret_cast<const __m128i*>(q);
      _mm512_storeu_ps(out, _mm512_mul_ps(d0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(row)))));
      _mm512_storeu_ps(out + kVl, _mm512_mul_ps(d1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(row + 1)))));
    }
  }
#else
  float d[kPanel], m[kPanel] = {};
  auto halves = [&](int64_t at, float* dst) {  // kPanel float16s at block + at.
    for (int64_t c = 0; c < kPanel; ++c) {
      uint16_t h;
      __builtin_memcpy(&h, block + at + 2 * c, 2);
      dst[c] = HalfToFloat(h);
    }
  };
  halves(0, d);
  if (format == kQ4_1) {
    halves(2 * kPanel, m);
    const uint8_t* q = block + 4 * kPanel;
    constexpr int64_t kHalf = kPanel / 2;
    for (int64_t r = 0; r < kQRows; ++r, q += kHalf, out += kPanel) {
      for (int64_t c = 0; c < kHalf; ++c) {
        out[c] = d[c] * static_cast<float>(q[c] & 15) + m[c];
        out[kHalf + c] = d[kHalf + c] * static_cast<float>(q[c] >> 4) + m[kHalf + c];
      }
    }
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(block + 2 * kPanel);
    for (int64_t r = 0; r < kQRows; ++r, q += kPanel, out += kPanel) {
      for (int64_t c = 0; c < kPanel; ++c) out[c] = d[c] * static_cast<float>(q[c]);
    }
  }
#endif
}

void RunBlock(const Problem& p, int64_t lo, int64_t hi, bool split_m) {
  if (p.m <= kSmallM && !p.ta) {
    const int64_t m0 = split_m ? lo : 0, m1 = split_m ? hi : p.m;
    const int64_t n0 = split_m ? 0 : lo, n1 = split_m ? p.n : hi;
    return p.tb ? StreamNt(p, m0, m1, n0, n1) : StreamNn(p, m0, m1, n0, n1);
  }
  const float* a = p.a;
  const float* b = p.b;
  float* c = p.c;
  int64_t m = p.m, n = p.n;
  if (split_m) {  // Rows lo..hi of op(a) and of c.
    a += p.ta ? lo : lo * p.lda;
    c += lo * p.n;
    m = hi - lo;
  } else {  // Columns lo..hi of op(b) and of c.
    b += p.tb ? lo * p.ldb : lo;
    c += lo;
    n = hi - lo;
  }
  g_sgemm(kRowMajor, p.ta ? kTrans : kNoTrans, p.tb ? kTrans : kNoTrans,
          static_cast<int>(m), static_cast<int>(n), static_cast<int>(p.k), 1.0f,
          a, static_cast<int>(p.lda), b, static_cast<int>(p.ldb), 0.0f, c,
          static_cast<int>(p.n));
}

// fn(0..n-1) on the calling thread and XLA's pool: whoever runs takes the
// next unclaimed index, so the caller never waits on a task that has not
// started (no deadlock when every pool thread is in a call), and a pool
// thread that wakes late (tens of microseconds on the dev VM) just finds less
// left to do. Tasks that start after the last index is claimed touch only
// the shared counters, never fn.
void ParallelFor(ffi::ThreadPool& pool, int64_t n,
                 std::function<void(int64_t)> fn) {
  struct State {
    std::function<void(int64_t)> fn;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->fn = std::move(fn);
  state->n = n;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, n); ++t) {
    pool.Schedule([state] { state->Work(); });
  }
  state->Work();
  while (state->done.load(std::memory_order_acquire) < n) {
    std::this_thread::yield();
  }
}

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                    ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                    bool transpose_a, bool transpose_b) {
  if (g_sgemm == nullptr) {
    return ffi::Error::Internal("fedjax_u2s cpu_gemm: no sgemm registered");
  }
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  const size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank || od.size() != rank) {
    return ffi::Error::InvalidArgument("cpu_gemm: operands need equal rank >= 2");
  }
  const int64_t m = transpose_a ? ad[rank - 1] : ad[rank - 2];
  const int64_t k = transpose_a ? ad[rank - 2] : ad[rank - 1];
  const int64_t kb = transpose_b ? bd[rank - 1] : bd[rank - 2];
  const int64_t n = transpose_b ? bd[rank - 2] : bd[rank - 1];
  if (k != kb || od[rank - 2] != m || od[rank - 1] != n) {
    return ffi::Error::InvalidArgument("cpu_gemm: contracting dims disagree");
  }
  // Batch dims: broadcast of a's and b's, each either equal or 1.
  int64_t batch = 1, a_batch = 1;
  bool b_shared = true;
  for (size_t i = 0; i + 2 < rank; ++i) {
    const int64_t x = ad[i], y = bd[i], o = od[i];
    if ((x != o && x != 1) || (y != o && y != 1)) {
      return ffi::Error::InvalidArgument("cpu_gemm: batch dims do not broadcast");
    }
    batch *= o;
    a_batch *= x;
    b_shared = b_shared && y == 1;
  }
  float* op = out->typed_data();
  if (m == 0 || n == 0 || batch == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(op, op + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  const int64_t lda = transpose_a ? m : k, ldb = transpose_b ? k : n;

  std::vector<Problem> problems;
  if (b_shared && !transpose_a && a_batch == batch) {
    // b shared by the whole batch: fold the batch into M, one product.
    problems.push_back({ap, bp, op, batch * m, n, k, lda, ldb, transpose_a,
                        transpose_b});
  } else {
    // Walk the output's batch index, mapping it into a and b (a broadcast
    // dim contributes stride 0).
    std::vector<int64_t> idx(rank - 2, 0);
    for (int64_t bi = 0; bi < batch; ++bi) {
      int64_t ao = 0, bo = 0, as = 1, bs = 1;
      for (size_t d = rank - 2; d-- > 0;) {
        if (ad[d] != 1) ao += idx[d] * as;
        if (bd[d] != 1) bo += idx[d] * bs;
        as *= ad[d];
        bs *= bd[d];
      }
      problems.push_back({ap + ao * m * k, bp + bo * k * n, op + bi * m * n, m,
                          n, k, lda, ldb, transpose_a, transpose_b});
      for (size_t d = rank - 2; d-- > 0;) {
        if (++idx[d] < od[d]) break;
        idx[d] = 0;
      }
    }
  }
  // Split each product along its longer output dim into about one block per
  // thread (at least kMinBlock rows/columns, so small products stay whole).
  constexpr int64_t kMinBlock = 64;
  const Problem& p0 = problems.front();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t products = static_cast<int64_t>(problems.size());
  const bool split_m = p0.m >= p0.n;
  const int64_t extent = split_m ? p0.m : p0.n;
  const int64_t want = products >= threads ? 1 : (threads + products - 1) / products;
  int64_t blocks = std::max<int64_t>(1, std::min(want, extent / kMinBlock));
  int64_t block = (extent + blocks - 1) / blocks;
  if (!split_m) block = (block + kNnBlock - 1) / kNnBlock * kNnBlock;  // Tiles.
  blocks = (extent + block - 1) / block;
  ParallelFor(pool, products * blocks, [&](int64_t i) {
    const int64_t lo = (i % blocks) * block;
    RunBlock(problems[i / blocks], lo, std::min(lo + block, extent), split_m);
  });
  return ffi::Error::Success();
}


// out[..., N] = a[..., K] w for w packed as panels: float32 [1.., P, K,
// kPanel], or in a block format [1.., P, K / kQRows, BlockBytes] (leading
// size-1 dims: jax.vmap's "expand_dims" of an unbatched weight). With glu,
// panels hold w_gate's panels and then w_up's (2 ceil(N/32) in all) and out
// = silu(a w_gate) * (a w_up): SwiGLU's two products and its product of
// activations in one call.
ffi::Error PackedProducts(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& a,
                          ffi::Span<const int64_t> pd, const void* weights,
                          ffi::ResultBuffer<ffi::F32>& out, bool glu,
                          int32_t format) {
  auto ad = a.dimensions(), od = out->dimensions();
  if (ad.size() < 1 || od.size() != ad.size() || pd.size() < 3) {
    return ffi::Error::InvalidArgument(
        "cpu_gemm packed: want a [..., K], panels [P, K, 32] (or [P, K/32, "
        "bytes] in a block format), out [..., N]");
  }
  for (size_t i = 0; i + 3 < pd.size(); ++i) {
    if (pd[i] != 1) {
      return ffi::Error::InvalidArgument(
          "cpu_gemm packed: a batched (vmapped) packed weight is not supported");
    }
  }
  const size_t r = pd.size();
  const int64_t num_panels = pd[r - 3], n = od[od.size() - 1];
  const int64_t k = format == kF32 ? pd[r - 2] : pd[r - 2] * kQRows;
  const int64_t row = format == kF32 ? kPanel : BlockBytes(format);
  int64_t m = 1;
  for (size_t i = 0; i + 1 < ad.size(); ++i) {
    if (ad[i] != od[i]) {
      return ffi::Error::InvalidArgument("cpu_gemm packed: a and out disagree");
    }
    m *= ad[i];
  }
  const int64_t out_panels = (n + kPanel - 1) / kPanel;
  if ((format != kF32 && format != kQ4_1 && format != kQ8_0) ||
      pd[r - 1] != row || ad[ad.size() - 1] != k ||
      num_panels != (glu ? 2 : 1) * out_panels) {
    return ffi::Error::InvalidArgument(
        "cpu_gemm packed: panels are not [ceil(N/32), K, 32] (or [ceil(N/32), "
        "K/32, block bytes]; twice that for glu) for a [..., K]");
  }
  const float* ap = a.typed_data();
  float* op = out->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  // A few panels per task, several tasks per thread: a pool thread that
  // starts late still takes a share.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = std::max<int64_t>(1, out_panels / (4 * threads));
  const int64_t tasks = (out_panels + per - 1) / per;
  ParallelFor(pool, tasks, [&](int64_t t) {
    thread_local std::vector<float> tile, up, chunk;
    // a [m, K] x panel -> dst [m, kPanel] (row stride ldd).
    auto rows = [&](const float* a0, const float* b, float* dst, int64_t ldd,
                    int64_t kn, bool accumulate) {
      for (int64_t i = 0; i < m; i += kPkRows) {
        TileNnRows<kPkRows, kPkVecs>(m - i, a0 + i * k, k, b, kPanel,
                                     dst + i * ldd, ldd, kn, accumulate);
      }
    };
    auto product = [&](int64_t panel, float* dst, int64_t ldd) {
      if (format == kF32) {
        const float* p = static_cast<const float*>(weights) + panel * k * kPanel;
        return rows(ap, p, dst, ldd, k, false);
      }
      const uint8_t* blocks =
          static_cast<const uint8_t*>(weights) + panel * (k / kQRows) * row;
      chunk.resize(kQChunk * kPanel);
      for (int64_t k0 = 0; k0 < k; k0 += kQChunk) {
        const int64_t kn = std::min(kQChunk, k - k0);
        for (int64_t x = 0; x < kn; x += kQRows) {
          const uint8_t* block = blocks + (k0 + x) / kQRows * row;
          for (int64_t l = 0; l < row; l += 64) {
            __builtin_prefetch(block + 4 * row + l);
          }
          DequantBlock(format, block, chunk.data() + x * kPanel);
        }
        rows(ap + k0, chunk.data(), dst, ldd, kn, k0 != 0);
      }
    };
    for (int64_t q = t * per; q < std::min(out_panels, (t + 1) * per); ++q) {
      const int64_t width = std::min(kPanel, n - q * kPanel);
      if (!glu && width == kPanel) {
        product(q, op + q * kPanel, n);
        continue;
      }
      // Into a whole-panel tile: the last panel of an N that is not a
      // multiple of kPanel, or the gate half of SwiGLU.
      tile.resize(m * kPanel);
      product(q, tile.data(), kPanel);
      if (glu) {
        up.resize(m * kPanel);
        product(out_panels + q, up.data(), kPanel);
        for (int64_t x = 0; x < m * kPanel; x += kVl) {
          const Vec g = Load(tile.data() + x);
          Store(tile.data() + x, g / (1.0f + Exp(Vec{} - g)) * Load(up.data() + x));
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        std::copy(tile.data() + i * kPanel, tile.data() + i * kPanel + width,
                  op + i * n + q * kPanel);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error PackedGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                          ffi::Buffer<ffi::F32> panels,
                          ffi::ResultBuffer<ffi::F32> out, bool glu) {
  return PackedProducts(pool, a, panels.dimensions(), panels.typed_data(), out,
                        glu, kF32);
}

ffi::Error QuantGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                         ffi::Buffer<ffi::U8> blocks,
                         ffi::ResultBuffer<ffi::F32> out, bool glu,
                         int32_t format) {
  if (format == kF32) {
    return ffi::Error::InvalidArgument("cpu_gemm quant: format is a block format");
  }
  return PackedProducts(pool, a, blocks.dimensions(), blocks.typed_data(), out,
                        glu, format);
}

// ---------------------------------------------------------------------------
// Attention of a few query rows over a KV cache (decoding), fused: scores,
// masked softmax and the weighted sum of values in one pass per (row, KV
// head), touching only the cache slots the mask lets the query see. As
// separate products and XLA fusions this was 2 calls and ~6 small fusions
// per layer, reading every slot of the cache, valid or not.


// Softmax weights over the n listed slots for one query row, in probs (its
// tail up to a whole vector zeroed); returns 1 / their sum. HV vectors per
// head (0: any hd, unvectorised tails).
template <int HV>
float Scores(const float* q, const float* keys, const int32_t* slots, int64_t n,
             bool none, int64_t hd, float scale, float* probs) {
  const int64_t padded = (n + kVl - 1) / kVl * kVl;
  float m = -3.0e38f;
  if (none) {
    std::fill(probs, probs + n, 0.0f);
    m = 0.0f;
  } else if constexpr (HV > 0) {
    Vec qv[HV];
    for (int v = 0; v < HV; ++v) qv[v] = Load(q + v * kVl) * scale;
    for (int64_t i = 0; i < n; ++i) {
      const float* k = keys + slots[i] * hd;
      Vec acc = qv[0] * Load(k);
      for (int v = 1; v < HV; ++v) acc += qv[v] * Load(k + v * kVl);
      probs[i] = Sum(acc);
      m = std::max(m, probs[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float* k = keys + slots[i] * hd;
      float acc = 0.0f;
      for (int64_t d = 0; d < hd; ++d) acc += q[d] * scale * k[d];
      probs[i] = acc;
      m = std::max(m, acc);
    }
  }
  for (int64_t i = n; i < padded; ++i) probs[i] = -3.0e38f;  // exp -> 0
  Vec total{};
  for (int64_t i = 0; i < padded; i += kVl) {
    const Vec e = Exp(Load(probs + i) - m);
    Store(probs + i, e);
    total += e;
  }
  return 1.0f / Sum(total);
}

// out [hd] = sum_i probs[i] * inv * values[slots[i]], in registers.
template <int HV>
void Mix(const float* values, const int32_t* slots, const float* probs,
         int64_t n, int64_t hd, float inv, float* out) {
  if constexpr (HV > 0) {
    Vec acc[HV] = {};
    for (int64_t i = 0; i < n; ++i) {
      const float* v = values + slots[i] * hd;
      const Vec w = Splat(probs[i]);
      for (int j = 0; j < HV; ++j) acc[j] += w * Load(v + j * kVl);
    }
    for (int j = 0; j < HV; ++j) Store(out + j * kVl, acc[j] * inv);
  } else {
    std::fill(out, out + hd, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float* v = values + slots[i] * hd;
      for (int64_t d = 0; d < hd; ++d) out[d] += probs[i] * v[d];
    }
    for (int64_t d = 0; d < hd; ++d) out[d] *= inv;
  }
}

// One (batch row, KV head): q [R, hd] rows r = g * T + t (mask row t),
// keys/values [S, hd], mask [T, S], out [R, hd]. A row that sees no slot
// gets the mean of all values, as a softmax over equal -1e30 scores does.
template <int HV>
void AttendGroup(const float* q, const float* keys, const float* values,
                 const bool* mask, float* out, int64_t rows, int64_t t_len,
                 int64_t s_len, int64_t hd, float scale,
                 std::vector<int32_t>& slots, std::vector<float>& probs) {
  for (int64_t t = 0; t < t_len; ++t) {
    slots.clear();
    for (int64_t j = 0; j < s_len; ++j) {
      if (mask[t * s_len + j]) slots.push_back(static_cast<int32_t>(j));
    }
    const bool none = slots.empty();
    if (none) {
      for (int64_t j = 0; j < s_len; ++j) slots.push_back(static_cast<int32_t>(j));
    }
    const int64_t n = static_cast<int64_t>(slots.size());
    probs.resize((n + kVl - 1) / kVl * kVl);
    for (int64_t r = t; r < rows; r += t_len) {
      const float inv = Scores<HV>(q + r * hd, keys, slots.data(), n, none, hd,
                                   scale, probs.data());
      Mix<HV>(values, slots.data(), probs.data(), n, hd, inv, out + r * hd);
    }
  }
}

// q [B, K, R, hd], keys/values [B, K, S, hd], mask [B, T, S] -> out
// [B, K, R, hd], R = G * T (query row g * T + t sees mask[b, t]).
ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                         ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                         ffi::Buffer<ffi::PRED> mask,
                         ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = keys.dimensions(), md = mask.dimensions();
  auto same = [](auto x, auto y) { return std::equal(x.begin(), x.end(), y.begin(), y.end()); };
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 ||
      !same(values.dimensions(), kd) || !same(out->dimensions(), qd) || kd[0] != qd[0] ||
      kd[1] != qd[1] || kd[3] != qd[3] || md[0] != qd[0] || md[2] != kd[2] ||
      md[1] == 0 || qd[2] % md[1] != 0) {
    return ffi::Error::InvalidArgument(
        "cpu attention: want q [B, K, G*T, hd], keys/values [B, K, S, hd], "
        "mask [B, T, S]");
  }
  const int64_t b = qd[0], kh = qd[1], rows = qd[2], hd = qd[3];
  const int64_t t_len = md[1], s_len = kd[2];
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data();
  const float* vp = values.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  if (s_len == 0) {
    std::fill(op, op + b * kh * rows * hd, 0.0f);
    return ffi::Error::Success();
  }
  // Vectorised for heads of 2, 4 or 8 vectors (hd 32, 64, 128 with AVX-512).
  auto group = hd == 2 * kVl   ? AttendGroup<2>
               : hd == 4 * kVl ? AttendGroup<4>
               : hd == 8 * kVl ? AttendGroup<8>
                               : AttendGroup<0>;
  ParallelFor(pool, b * kh, [&](int64_t i) {
    thread_local std::vector<int32_t> slots;
    thread_local std::vector<float> probs;
    group(qp + i * rows * hd, kp + i * s_len * hd, vp + i * s_len * hd,
          mp + i / kh * t_len * s_len, op + i * rows * hd, rows, t_len, s_len, hd,
          scale, slots, probs);
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FedjaxU2sCpuGemm, GemmImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<bool>("transpose_a")
        .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FedjaxU2sCpuPackedGemm, PackedGemmImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<bool>("glu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FedjaxU2sCpuQuantGemm, QuantGemmImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::U8>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<bool>("glu")
        .Attr<int32_t>("format"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FedjaxU2sCpuAttention, AttentionImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::PRED>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<float>("scale"));

// Encodes w (element (k, n) at w[k * sk + n * sn], K a multiple of kQRows)
// as panels in a block format, [ceil(N / kPanel), K / kQRows, BlockBytes]
// at out, choosing each block's scale (and minimum) as GGUF's quantisers
// do. Returns 1 if every value is reproduced exactly, else 0 (stopping at
// the first that is not: a weight that did not come from this format is
// refused after one block).
extern "C" int fedjax_u2s_encode_blocks(const float* w, int64_t k, int64_t n,
                                        int64_t sk, int64_t sn, int32_t format,
                                        uint8_t* out) {
  if (k % kQRows != 0 || (format != kQ4_1 && format != kQ8_0)) return 0;
  const int64_t bytes = BlockBytes(format), blocks = k / kQRows;
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* block = out + (p * blocks + b) * bytes;
      std::fill(block, block + bytes, 0);
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t col = p * kPanel + c;
        float x[kQRows] = {};  // Columns past N: zeros.
        if (col < n) {
          for (int64_t r = 0; r < kQRows; ++r) x[r] = w[(b * kQRows + r) * sk + col * sn];
        }
        float lo = x[0], hi = x[0], amax = 0.0f;
        for (float v : x) {
          lo = std::min(lo, v);
          hi = std::max(hi, v);
          amax = std::max(amax, std::fabs(v));
        }
        const bool q4 = format == kQ4_1;
        const uint16_t d16 = FloatToHalf(q4 ? (hi - lo) / 15.0f : amax / 127.0f);
        const uint16_t m16 = FloatToHalf(lo);
        const float d = HalfToFloat(d16), m = q4 ? HalfToFloat(m16) : 0.0f;
        __builtin_memcpy(block + 2 * c, &d16, 2);
        if (q4) __builtin_memcpy(block + 2 * kPanel + 2 * c, &m16, 2);
        for (int64_t r = 0; r < kQRows; ++r) {
          float q = d > 0.0f ? std::nearbyint((x[r] - m) / d) : 0.0f;
          q = q4 ? std::min(15.0f, std::max(0.0f, q))
                 : std::min(127.0f, std::max(-127.0f, q));
          if (!(d * q + m == x[r])) return 0;
          if (q4) {
            const int64_t half = kPanel / 2;
            block[4 * kPanel + r * half + c % half] |=
                static_cast<uint8_t>(static_cast<int>(q) << (c < half ? 0 : 4));
          } else {
            block[2 * kPanel + r * kPanel + c] =
                static_cast<uint8_t>(static_cast<int8_t>(q));
          }
        }
      }
    }
  }
  return 1;
}

extern "C" void fedjax_u2s_set_sgemm(void* fn) {
  g_sgemm = reinterpret_cast<SgemmFn>(fn);
}
