// The CPU linear layers (core/cpu/cpu_gemm.h) split their work over the thread pool; every output
// element is bit-identical to one whole single-threaded OpenBLAS call (f32), to the row computed on
// its own (bf16 GEMV) or to the converted blocks run one after another (bf16 prefill), whatever the
// split.
#include <cblas.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "core/cpu/cpu_gemm.h"
#include "core/cpu/parallel_for.h"

namespace specontext {
namespace {

class FourThreads : public ::testing::Environment {
 public:
  void SetUp() override { SetCpuThreads(4); }
};
const auto* const kFourThreads = ::testing::AddGlobalTestEnvironment(new FourThreads);

std::vector<float> Random(int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(count);
  for (float& x : v) x = dist(rng);
  return v;
}

struct Shape {
  int64_t n, k, m;
};

// Shapes whose row counts are not multiples of the split, and large enough to go parallel.
const Shape kShapes[] = {{1, 64, 4099},  {1, 300, 1000}, {1, 2048, 517}, {3, 256, 1000},
                         {8, 128, 2050}, {17, 96, 1300}, {64, 256, 777}, {12, 4096, 1100}};

TEST(CpuGemmSplit, F32MatchesOneSingleThreadedCall) {
  ASSERT_EQ(CpuThreads(), 4);
  for (const Shape& s : kShapes) {
    const std::vector<float> x = Random(s.n * s.k, 1), w = Random(s.m * s.k, 2);
    std::vector<float> got(s.n * s.m), want(s.n * s.m);
    LinearF32(x.data(), w.data(), got.data(), s.n, s.k,
              s.m);  // first: leaves OpenBLAS single-threaded
    if (s.n == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, s.m, s.k, 1.0f, w.data(), s.k, x.data(), 1, 0.0f,
                  want.data(), 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.n, s.m, s.k, 1.0f, x.data(), s.k,
                  w.data(), s.k, 0.0f, want.data(), s.m);
    }
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
        << "n " << s.n << " k " << s.k << " m " << s.m;
  }
}

TEST(CpuGemmSplit, Bf16MatchesEachRowOnItsOwn) {
  for (const Shape& s : kShapes) {
    const std::vector<float> x = Random(s.n * s.k, 3), wf = Random(s.m * s.k, 4);
    std::vector<uint16_t> w(wf.size());
    for (size_t i = 0; i < wf.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &wf[i], 4);
      w[i] = static_cast<uint16_t>(bits >> 16);
    }
    std::vector<float> got(s.n * s.m), want(s.n * s.m), col(s.n);
    LinearBf16(x.data(), w.data(), got.data(), s.n, s.k, s.m);
    // One output row at a time is a single range: no split at all.
    for (int64_t j = 0; j < s.m && s.n <= 8; ++j) {
      LinearBf16(x.data(), w.data() + j * s.k, col.data(), s.n, s.k, 1);
      for (int64_t i = 0; i < s.n; ++i) want[i * s.m + j] = col[i];
    }
    if (s.n > 8) {
      // Prefill: blocks of 8 MiB of f32 rows (at least 64), converted, one sgemm each, in order.
      std::vector<float> wc(wf.size());
      for (size_t i = 0; i < w.size(); ++i) {
        const uint32_t bits = static_cast<uint32_t>(w[i]) << 16;
        std::memcpy(&wc[i], &bits, 4);
      }
      const int64_t block =
          std::max<int64_t>(64, std::min<int64_t>(s.m, (int64_t{8} << 20) / (4 * s.k)));
      for (int64_t j0 = 0; j0 < s.m; j0 += block) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.n, std::min(block, s.m - j0), s.k,
                    1.0f, x.data(), s.k, wc.data() + j0 * s.k, s.k, 0.0f, want.data() + j0, s.m);
      }
    }
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
        << "n " << s.n << " k " << s.k << " m " << s.m;
  }
}

}  // namespace
}  // namespace specontext
