#include "core/cpu/cpu_gemm.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/parallel/parallel_for.h"

namespace specontext {
namespace {

constexpr int64_t kGemvMaxRows = 8;  // up to this many activation rows use the bf16 GEMV

// OpenBLAS runs single-threaded: its threads wait for each other by spinning and yielding, which
// made decode 38x slower when other processes shared the cores. The pool splits the work instead,
// where a split leaves every output bit as one whole call computes it.
void SingleThreadedBlas() {
  static const bool once = (openblas_set_num_threads(1), true);
  (void)once;
}

// sgemv takes weight rows in small groups, the last partial group on another path: ranges that
// start on a multiple of this keep every row on the path (and the bits) it has in one whole call.
constexpr int64_t kSgemvRowAlign = 16;

// out[m] = w[m, k] · x[k], split by weight rows over the pool.
void SgemvRows(const float* x, const float* w, float* out, int64_t k, int64_t m) {
  const int64_t groups = (m + kSgemvRowAlign - 1) / kSgemvRowAlign;
  ParallelFor(groups, k * kSgemvRowAlign, [&](int64_t g0, int64_t g1) {
    const int64_t j0 = g0 * kSgemvRowAlign, j1 = std::min(m, g1 * kSgemvRowAlign);
    cblas_sgemv(CblasRowMajor, CblasNoTrans, j1 - j0, k, 1.0f, w + j0 * k, k, x, 1, 0.0f, out + j0,
                1);
  });
}

// Prefill splits the weight rows (out's columns) into blocks of this many, one sgemm each. sgemm
// picks its kernels and blocking by the shape it is given, so the bounds are fixed, never derived
// from the thread count: every thread count gives the same bits. With OpenBLAS 0.3.21 (Zen
// kernels) a process whose first sgemm had 128 or 256 such rows ran every later one about 2.3x
// slower; 512 rows ran as fast as whole layers (1,104 tokens, k = 1024 and 2816).
constexpr int64_t kSgemmBlockRows = 512;
static_assert(kSgemmBlockRows % kSgemvRowAlign == 0);

// out[n, m] = x[n, k] · w[m, k]ᵀ, one sgemm per fixed block of weight rows, over the pool.
void SgemmRowBlocks(const float* x, const float* w, float* out, int64_t n, int64_t k, int64_t m) {
  const int64_t blocks = (m + kSgemmBlockRows - 1) / kSgemmBlockRows;
  ParallelFor(blocks, n * k * kSgemmBlockRows, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kSgemmBlockRows, rows = std::min(kSgemmBlockRows, m - j0);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, k, 1.0f, x, k, w + j0 * k, k,
                  0.0f, out + j0, m);
    }
  });
}

// One output row block of the bf16 GEMV. Compiled for AVX-512, AVX2 and baseline x86-64, picked at
// run time; -ffast-math on this file lets the compiler vectorise the reductions.
__attribute__((target_clones("avx512f", "avx2", "default"))) void GemvBf16Rows(
    const float* x, const uint16_t* w, float* out, int64_t n, int64_t k, int64_t m, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* row = w + j * k;
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * k;
      float acc = 0.0f;
      for (int64_t e = 0; e < k; ++e) {
        const uint32_t bits = static_cast<uint32_t>(row[e]) << 16;
        float wf;
        std::memcpy(&wf, &bits, 4);
        acc += xi[e] * wf;
      }
      out[i * m + j] = acc;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void Bf16RowsToF32(const uint16_t* w, float* out,
                                                                                  int64_t count) {
  for (int64_t e = 0; e < count; ++e) {
    const uint32_t bits = static_cast<uint32_t>(w[e]) << 16;
    std::memcpy(&out[e], &bits, 4);
  }
}

}  // namespace

void LinearF32(const float* x, const float* w, float* out, int64_t n, int64_t k, int64_t m, bool row_invariant) {
  SingleThreadedBlas();
  if (row_invariant) {
    for (int64_t i = 0; i < n; ++i) SgemvRows(x + i * k, w, out + i * m, k, m);
    return;
  }
  if (n == 1) {
    SgemvRows(x, w, out, k, m);
  } else {
    SgemmRowBlocks(x, w, out, n, k, m);
  }
}

void LinearBf16(const float* x, const uint16_t* w, float* out, int64_t n, int64_t k, int64_t m,
                bool row_invariant) {
  // The GEMV computes each (row, output) dot product alone, in the same order for any n.
  if (n <= kGemvMaxRows || row_invariant) {
    ParallelFor(m, n * k, [&](int64_t j0, int64_t j1) { GemvBf16Rows(x, w, out, n, k, m, j0, j1); });
    return;
  }
  // The f32 path's fixed blocks, each converted to f32 first: the bits match LinearF32 on the
  // converted weights and do not depend on the thread count.
  SingleThreadedBlas();
  const int64_t block = kSgemmBlockRows;
  const int64_t n_blocks = (m + block - 1) / block;
  ParallelFor(n_blocks, block * k * n, [&](int64_t b0, int64_t b1) {
    std::vector<float> wf(static_cast<size_t>(std::min(block, m) * k));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * block, rows = std::min(block, m - j0);
      Bf16RowsToF32(w + j0 * k, wf.data(), rows * k);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, k, 1.0f, x, k, wf.data(), k,
                  0.0f, out + j0, m);
    }
  });
}

}  // namespace specontext
