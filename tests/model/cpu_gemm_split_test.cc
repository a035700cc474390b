// The CPU linear layers (core/cpu/cpu_gemm.h) split their work over the thread pool; every output
// element is bit-identical to one whole single-threaded OpenBLAS call (f32 GEMV), to the row
// computed on its own (bf16 GEMV) or to the fixed row blocks run one after another (prefill), and
// the same at any thread count.
#include <cblas.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "core/cpu/cpu_gemm.h"
#include "core/parallel/parallel_for.h"

namespace specontext {
namespace {

// The pool's size is fixed for the process, so other thread counts run in child processes.
constexpr char kThreadsEnv[] = "SPC_GEMM_SPLIT_THREADS";
constexpr char kOutEnv[] = "SPC_GEMM_SPLIT_OUT";

int TestThreads() {
  const char* t = std::getenv(kThreadsEnv);
  return t != nullptr ? std::atoi(t) : 4;
}

class PoolThreads : public ::testing::Environment {
 public:
  void SetUp() override { SetCpuThreads(TestThreads()); }
};
const auto* const kPoolThreads = ::testing::AddGlobalTestEnvironment(new PoolThreads);

// The prefill block (kSgemmBlockRows in cpu_gemm.cc).
constexpr int64_t kBlockRows = 512;

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
// Prefill shapes: fewer rows than a block, one more than a block, exact multiples and remainders.
const Shape kPrefillShapes[] = {{9, 64, 100},    {33, 200, 513}, {100, 96, 1000},
                                {17, 96, 1300},  {64, 256, 777}, {12, 4096, 1100},
                                {40, 512, 1024}, {300, 64, 385}, {128, 576, 1536}};

std::vector<uint16_t> ToBf16(const std::vector<float>& wf) {
  std::vector<uint16_t> w(wf.size());
  for (size_t i = 0; i < wf.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &wf[i], 4);
    w[i] = static_cast<uint16_t>(bits >> 16);
  }
  return w;
}

// The fixed blocks of weight rows, one sgemm each, in order on this thread.
void SerialBlocks(const std::vector<float>& x, const std::vector<float>& w, float* out,
                  const Shape& s) {
  for (int64_t j0 = 0; j0 < s.m; j0 += kBlockRows) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.n, std::min(kBlockRows, s.m - j0), s.k,
                1.0f, x.data(), s.k, w.data() + j0 * s.k, s.k, 0.0f, out + j0, s.m);
  }
}

TEST(CpuGemmSplit, F32MatchesSingleThreadedCalls) {
  ASSERT_EQ(CpuThreads(), TestThreads());
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.insert(shapes.end(), std::begin(kPrefillShapes), std::end(kPrefillShapes));
  for (const Shape& s : shapes) {
    const std::vector<float> x = Random(s.n * s.k, 1), w = Random(s.m * s.k, 2);
    std::vector<float> got(s.n * s.m), want(s.n * s.m);
    LinearF32(x.data(), w.data(), got.data(), s.n, s.k,
              s.m);  // first: leaves OpenBLAS single-threaded
    if (s.n == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, s.m, s.k, 1.0f, w.data(), s.k, x.data(), 1, 0.0f,
                  want.data(), 1);
    } else {
      SerialBlocks(x, w, want.data(), s);
    }
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
        << "n " << s.n << " k " << s.k << " m " << s.m;
  }
}

TEST(CpuGemmSplit, Bf16MatchesEachRowOnItsOwn) {
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.insert(shapes.end(), std::begin(kPrefillShapes), std::end(kPrefillShapes));
  for (const Shape& s : shapes) {
    const std::vector<float> x = Random(s.n * s.k, 3), wf = Random(s.m * s.k, 4);
    const std::vector<uint16_t> w = ToBf16(wf);
    std::vector<float> got(s.n * s.m), want(s.n * s.m), col(s.n);
    LinearBf16(x.data(), w.data(), got.data(), s.n, s.k, s.m);
    // One output row at a time is a single range: no split at all.
    for (int64_t j = 0; j < s.m && s.n <= 8; ++j) {
      LinearBf16(x.data(), w.data() + j * s.k, col.data(), s.n, s.k, 1);
      for (int64_t i = 0; i < s.n; ++i) want[i * s.m + j] = col[i];
    }
    if (s.n > 8) {
      // Prefill: the weights converted to f32, then the fixed blocks in order.
      std::vector<float> wc(wf.size());
      for (size_t i = 0; i < w.size(); ++i) {
        const uint32_t bits = static_cast<uint32_t>(w[i]) << 16;
        std::memcpy(&wc[i], &bits, 4);
      }
      SerialBlocks(x, wc, want.data(), s);
    }
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
        << "n " << s.n << " k " << s.k << " m " << s.m;
  }
}

// Run by PrefillSameBitsAtAnyThreadCount in a child process: writes the f32 and bf16 prefill
// outputs of every prefill shape to $SPC_GEMM_SPLIT_OUT.
TEST(CpuGemmSplit, DISABLED_WritePrefillOutputs) {
  const char* path = std::getenv(kOutEnv);
  ASSERT_NE(path, nullptr);
  ASSERT_EQ(CpuThreads(), TestThreads());
  std::ofstream file(path, std::ios::binary);
  for (const Shape& s : kPrefillShapes) {
    const std::vector<float> x = Random(s.n * s.k, 5), wf = Random(s.m * s.k, 6);
    const std::vector<uint16_t> w = ToBf16(wf);
    std::vector<float> f32(s.n * s.m), bf16(s.n * s.m);
    LinearF32(x.data(), wf.data(), f32.data(), s.n, s.k, s.m);
    LinearBf16(x.data(), w.data(), bf16.data(), s.n, s.k, s.m);
    file.write(reinterpret_cast<const char*>(f32.data()), f32.size() * sizeof(float));
    file.write(reinterpret_cast<const char*>(bf16.data()), bf16.size() * sizeof(float));
  }
  ASSERT_TRUE(file.good());
}

TEST(CpuGemmSplit, PrefillSameBitsAtAnyThreadCount) {
  char self[4096];
  const ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
  ASSERT_GT(len, 0);
  self[len] = '\0';
  const std::string dir = ::testing::TempDir();
  std::string first;
  for (const int threads : {1, 2, 3, 8}) {
    const std::string out =
        dir + "cpu_gemm_split_" + std::to_string(getpid()) + "_" + std::to_string(threads) + ".bin";
    const std::string command = std::string(kThreadsEnv) + "=" + std::to_string(threads) + " " +
                                kOutEnv + "=" + out + " '" + self +
                                "' --gtest_also_run_disabled_tests"
                                " --gtest_filter=CpuGemmSplit.DISABLED_WritePrefillOutputs"
                                " > /dev/null";
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
    std::ifstream file(out, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(file)), {});
    std::remove(out.c_str());
    ASSERT_FALSE(bytes.empty()) << threads << " threads";
    if (first.empty()) {
      first = bytes;
    } else {
      EXPECT_TRUE(bytes == first) << threads << " threads differ from 1";
    }
  }
}

}  // namespace
}  // namespace specontext
