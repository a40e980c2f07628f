// XLA:CPU custom call: float32 (batched) matrix product through a CBLAS sgemm.
//
// On skinny products XLA:CPU's own dot kernels are well behind MKL's sgemm
// (docs/benchmarks.md, "The sgemm kernel": [1, 576] x [576, 1536] at 3 vs 12
// GFLOP/s on 2 cores). The sgemm is not linked here: Python resolves it
// (ctypes, from the `mkl` wheel) and hands its address to fedjax_u2s_set_sgemm,
// so this file compiles against nothing but XLA's header-only FFI API.
//
// Operands are row-major with equal rank >= 2: a [..., M, K] (or [..., K, M]
// with transpose_a), b [..., K, N] (or [..., N, K] with transpose_b), out
// [..., M, N]. Each leading (batch) dim of a and b is either equal or 1 (a
// broadcast, as jax.vmap's "expand_dims" produces for an unbatched operand).
// When b is shared by the whole batch and a is not transposed, the batch is
// folded into M: one large sgemm instead of many small ones.

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstdint>
#include <thread>
#include <vector>

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

void RunBlock(const Problem& p, int64_t lo, int64_t hi, bool split_m) {
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

// Work shared between the calling thread and tasks on XLA's pool: whoever
// runs takes the next unclaimed block, so the caller never waits on a task
// that has not started (no deadlock when every pool thread is in a call).
struct Shared {
  std::vector<Problem> problems;
  int64_t blocks_per_problem = 1, block = 1, extent = 0;
  bool split_m = true;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    const int64_t total = static_cast<int64_t>(problems.size()) * blocks_per_problem;
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      const Problem& p = problems[i / blocks_per_problem];
      const int64_t lo = (i % blocks_per_problem) * block;
      RunBlock(p, lo, std::min(lo + block, extent), split_m);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

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

  auto shared = std::make_shared<Shared>();
  if (b_shared && !transpose_a && a_batch == batch) {
    // b shared by the whole batch: fold the batch into M, one product.
    shared->problems.push_back({ap, bp, op, batch * m, n, k, lda, ldb,
                                transpose_a, transpose_b});
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
      shared->problems.push_back({ap + ao * m * k, bp + bo * k * n,
                                  op + bi * m * n, m, n, k, lda, ldb,
                                  transpose_a, transpose_b});
      for (size_t d = rank - 2; d-- > 0;) {
        if (++idx[d] < od[d]) break;
        idx[d] = 0;
      }
    }
  }
  // Split each product along its longer output dim into about one block per
  // thread (at least kMinBlock rows/columns, so small products stay whole).
  constexpr int64_t kMinBlock = 64;
  const Problem& p0 = shared->problems.front();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t products = static_cast<int64_t>(shared->problems.size());
  shared->split_m = p0.m >= p0.n;
  shared->extent = shared->split_m ? p0.m : p0.n;
  const int64_t want = products >= threads ? 1 : (threads + products - 1) / products;
  shared->blocks_per_problem =
      std::max<int64_t>(1, std::min(want, shared->extent / kMinBlock));
  shared->block = (shared->extent + shared->blocks_per_problem - 1) /
                  shared->blocks_per_problem;
  shared->blocks_per_problem =
      (shared->extent + shared->block - 1) / shared->block;
  const int64_t total = products * shared->blocks_per_problem;
  for (int64_t t = 1; t < std::min(threads, total); ++t) {
    pool.Schedule([shared] { shared->Work(); });
  }
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < total) {
    std::this_thread::yield();
  }
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

extern "C" void fedjax_u2s_set_sgemm(void* fn) {
  g_sgemm = reinterpret_cast<SgemmFn>(fn);
}
