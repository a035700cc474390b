// GPU argmax and sampling: argmax against a host scan (ties -> lowest index), greedy equivalences,
// determinism per (seed, step), the support of top-k / top-p, and the sampled distribution against
// the softmax within a few standard errors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "core/cuda/sampling.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

Tensor Logits(int64_t batch, int64_t vocab, std::mt19937& rng, float scale) {
  Tensor t = Tensor::HostEmpty(DType::kF32, {batch, vocab});
  std::normal_distribution<float> n(0.0f, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = n(rng);
  return t;
}

std::vector<int32_t> Select(Backend& gpu, CudaSampler* sampler, const Tensor& host_logits,
                         const std::vector<RowSampling>* rows) {
  auto logits = *gpu.ToDevice(host_logits, DType::kF32, MemoryKind::kWorkspace);
  auto out = *gpu.Alloc(DType::kI32, {host_logits.dim(0)}, MemoryKind::kWorkspace);
  absl::Status s = rows == nullptr ? CudaArgmax(gpu, logits, &out) : sampler->Sample(logits, *rows, &out);
  EXPECT_TRUE(s.ok()) << s;
  Tensor host = Tensor::HostEmpty(DType::kI32, {host_logits.dim(0)});
  EXPECT_TRUE(gpu.ToHost(out, &host).ok());
  return std::vector<int32_t>(host.as<int32_t>(), host.as<int32_t>() + host.numel());
}

TEST(CudaSamplingTest, ArgmaxMatchesHostScanWithTies) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  for (int64_t vocab : {17, 2049, 128256}) {
    Tensor l = Logits(5, vocab, rng, 3.0f);
    // Row 1: a tie at the maximum; the lower index must win.
    float* r1 = l.as<float>() + vocab;
    const int64_t a = rng() % vocab, b = rng() % vocab;
    r1[a] = r1[b] = 100.0f;
    std::vector<int32_t> got = Select(*gpu, nullptr, l, nullptr);
    for (int64_t i = 0; i < 5; ++i) {
      const float* row = l.as<float>() + i * vocab;
      const int32_t want = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      EXPECT_EQ(got[i], want) << "vocab " << vocab << " row " << i;
    }
  }
}

TEST(CudaSamplingTest, GreedyCasesAndDeterminism) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  const int64_t batch = 6, vocab = 32000;
  auto sampler = CudaSampler::Create(*gpu, 64);
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  Tensor l = Logits(batch, vocab, rng, 2.0f);
  std::vector<int32_t> greedy = Select(*gpu, nullptr, l, nullptr);
  std::vector<RowSampling> rows(batch);
  for (int64_t i = 0; i < batch; ++i) {
    rows[i].seed = rng();
    rows[i].step = i;
    rows[i].temperature = i % 2 == 0 ? 0.0f : 0.7f;
    rows[i].top_k = i % 2 == 0 ? 0 : 1;
  }
  EXPECT_EQ(Select(*gpu, sampler->get(), l, &rows), greedy);
  for (auto& r : rows) {
    r.temperature = 0.9f;
    r.top_k = 40;
    r.top_p = 0.9f;
  }
  const std::vector<int32_t> a = Select(*gpu, sampler->get(), l, &rows);
  EXPECT_EQ(Select(*gpu, sampler->get(), l, &rows), a);  // same seeds and steps: same draws
  std::vector<RowSampling> bad = rows;
  bad[0].top_p = 0.0f;
  auto logits = *gpu->ToDevice(l, DType::kF32, MemoryKind::kWorkspace);
  auto out = *gpu->Alloc(DType::kI32, {batch}, MemoryKind::kWorkspace);
  EXPECT_EQ((*sampler)->Sample(logits, bad, &out).code(), absl::StatusCode::kInvalidArgument);
}

// Draws `n` samples of one logits row (one per batch row, steps 0..n-1) and compares frequencies
// with the expected distribution over the kept set.
void CheckDistribution(Backend& gpu, CudaSampler* sampler, int vocab, float temperature, int top_k, float top_p,
                       std::mt19937& rng) {
  const int n = 4096;
  Tensor one = Logits(1, vocab, rng, 1.5f);
  Tensor l = Tensor::HostEmpty(DType::kF32, {n, vocab});
  for (int i = 0; i < n; ++i) std::memcpy(l.as<float>() + int64_t{i} * vocab, one.data(), vocab * 4);
  std::vector<RowSampling> rows(n);
  const uint64_t seed = rng();
  for (int i = 0; i < n; ++i) rows[i] = RowSampling{seed, static_cast<uint64_t>(i), temperature, top_p, top_k, -1.0f};
  std::vector<int32_t> got = Select(gpu, sampler, l, &rows);
  // Expected: softmax(x / T), keep top-k, then the smallest prefix reaching top_p, renormalise.
  const float* x = one.as<float>();
  std::vector<int> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return x[a] > x[b]; });
  std::vector<double> p(vocab, 0.0);
  const int k = top_k > 0 ? std::min(top_k, vocab) : vocab;
  double z = 0;
  for (int i = 0; i < k; ++i) z += std::exp((x[order[i]] - x[order[0]]) / temperature);
  double cum = 0;
  int kept = 0;
  for (int i = 0; i < k; ++i) {
    cum += std::exp((x[order[i]] - x[order[0]]) / temperature) / z;
    ++kept;
    if (cum >= top_p) break;
  }
  double zk = 0;
  for (int i = 0; i < kept; ++i) zk += std::exp((x[order[i]] - x[order[0]]) / temperature);
  for (int i = 0; i < kept; ++i) p[order[i]] = std::exp((x[order[i]] - x[order[0]]) / temperature) / zk;
  std::vector<int> count(vocab, 0);
  for (int32_t id : got) {
    ASSERT_GE(id, 0);
    ASSERT_LT(id, vocab);
    EXPECT_GT(p[id], 0.0) << "token " << id << " is outside the kept set (top_k " << top_k << ", top_p " << top_p << ")";
    ++count[id];
  }
  for (int v = 0; v < vocab; ++v) {
    const double f = static_cast<double>(count[v]) / n;
    const double se = std::sqrt(p[v] * (1 - p[v]) / n);
    EXPECT_NEAR(f, p[v], 5 * se + 2e-3) << "token " << v << " T " << temperature << " top_k " << top_k << " top_p " << top_p;
  }
}

TEST(CudaSamplingTest, DistributionMatchesSoftmax) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  auto sampler = CudaSampler::Create(*gpu, 4096);
  ASSERT_TRUE(sampler.ok());
  CheckDistribution(*gpu, sampler->get(), 50, 1.0f, 0, 1.0f, rng);
  CheckDistribution(*gpu, sampler->get(), 50, 0.6f, 0, 1.0f, rng);
  CheckDistribution(*gpu, sampler->get(), 97, 1.0f, 5, 1.0f, rng);
  CheckDistribution(*gpu, sampler->get(), 97, 1.0f, 0, 0.5f, rng);
  CheckDistribution(*gpu, sampler->get(), 2049, 0.8f, 20, 0.8f, rng);
}

TEST(CudaSamplingTest, LargeVocabStaysInTopK) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  const int64_t batch = 32, vocab = 128256;
  auto sampler = CudaSampler::Create(*gpu, batch);
  ASSERT_TRUE(sampler.ok());
  Tensor l = Logits(batch, vocab, rng, 2.0f);
  std::vector<RowSampling> rows(batch);
  for (int64_t i = 0; i < batch; ++i) rows[i] = RowSampling{rng(), 7, 1.0f, 0.95f, 50, -1.0f};
  std::vector<int32_t> got = Select(*gpu, sampler->get(), l, &rows);
  for (int64_t i = 0; i < batch; ++i) {
    const float* row = l.as<float>() + i * vocab;
    std::vector<float> sorted(row, row + vocab);
    std::nth_element(sorted.begin(), sorted.begin() + 49, sorted.end(), std::greater<float>());
    EXPECT_GE(row[got[i]], sorted[49]) << "row " << i;
  }
}

}  // namespace
}  // namespace specontext::testing
