// CudaSelectTopB against the CPU reference SelectTopB on fresh random inputs: batches of sequences of
// different lengths and budgets, GQA 1/2/4/8, head_dim 64/128, head- and batch-level, f32 and bf16 inputs
// (bf16-representable values, so both paths see the same numbers; bf16 takes the tensor-core score kernel),
// exact ties (duplicated K rows), sink handling, contexts past the shared-memory top-B, bad input.
// Sets must be equal; a position may differ only when its weight is within rounding of the set's boundary.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/selection.h"
#include "core/sparse/selection.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct SelCase {
  int head_dim, n_kv, group, budget, sink;
  SelectionMode mode;
  std::vector<int> lens;
  std::vector<int> budgets;  // per-sequence overrides (0 = options'), empty = none
  bool ties = false;         // K rows drawn from 3 distinct rows: many exactly equal weights
  DType dtype = DType::kF32;
};

std::string Name(const SelCase& c) {
  std::string s = absl::StrCat("hd=", c.head_dim, " n_kv=", c.n_kv, " group=", c.group, " B=", c.budget,
                               " sink=", c.sink, c.mode == SelectionMode::kBatchLevel ? " batch" : " head",
                               c.ties ? " ties" : "", c.dtype == DType::kBF16 ? " bf16" : " f32", " lens=");
  for (int l : c.lens) absl::StrAppend(&s, l, ",");
  return s;
}

// Combined weights (double) of one set, as SelectTopB defines them, for the tie allowance.
std::vector<double> Combined(const Tensor& q, const Tensor& k, int len, int set, int heads_per_set, int group,
                             float scale) {
  const int64_t hd = q.dim(1), cap = k.dim(1);
  std::vector<double> comb(len, 0.0), w(len);
  for (int j = 0; j < heads_per_set; ++j) {
    const int h = set * heads_per_set + j, g = h / group;
    double mx = -INFINITY, sum = 0;
    for (int t = 0; t < len; ++t) {
      double d = 0;
      for (int64_t e = 0; e < hd; ++e) d += double(q.as<float>()[h * hd + e]) * k.as<float>()[(g * cap + t) * hd + e];
      w[t] = d * scale;
      mx = std::max(mx, w[t]);
    }
    for (int t = 0; t < len; ++t) sum += std::exp(w[t] - mx);
    for (int t = 0; t < len; ++t) comb[t] = std::max(comb[t], std::exp(w[t] - mx) / sum);
  }
  return comb;
}

void RunCase(Backend& gpu, const SelCase& c) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  const std::string what = absl::StrCat(Name(c), " seed ", seed);
  const int n_q = c.n_kv * c.group, hd = c.head_dim;
  std::vector<Tensor> hq, hk;
  std::vector<SelectionQuery> cpu_batch, gpu_batch;
  for (size_t i = 0; i < c.lens.size(); ++i) {
    const int cap = c.lens[i] + static_cast<int>(rng() % 5);
    hq.push_back(RandomHost({n_q, hd}, rng, -2.0f, 2.0f));
    Tensor k = RandomHost({c.n_kv, std::max(cap, 1), hd}, rng);
    if (c.ties) {
      for (int g = 0; g < c.n_kv; ++g) {
        for (int t = 3; t < cap; ++t) {
          std::copy_n(k.as<float>() + (int64_t(g) * cap + rng() % 3) * hd, hd, k.as<float>() + (int64_t(g) * cap + t) * hd);
        }
      }
    }
    hk.push_back(k);
    const int b = c.budgets.empty() ? 0 : c.budgets[i];
    cpu_batch.push_back({hq.back(), hk.back(), c.lens[i], b});
    auto gq = gpu.ToDevice(hq.back(), c.dtype, MemoryKind::kRetrieval);
    auto gk = gpu.ToDevice(hk.back(), c.dtype, MemoryKind::kRetrieval);
    ASSERT_TRUE(gq.ok() && gk.ok());
    gpu_batch.push_back({*gq, *gk, c.lens[i], b});
  }
  SelectionOptions opt;
  opt.budget = c.budget;
  opt.sink = c.sink;
  opt.mode = c.mode;
  auto want = SelectTopB(cpu_batch, opt);
  ASSERT_TRUE(want.ok()) << want.status();
  SelectionResult got;
  got.sets.indices.assign(5, -7);  // stale content must be replaced
  absl::Status st = CudaSelectTopB(gpu, gpu_batch, opt, &got);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  ASSERT_TRUE(ValidateIndexSets(got.sets).ok()) << what << ": " << ValidateIndexSets(got.sets);
  EXPECT_EQ(got.sets.indptr, want->sets.indptr) << what;
  EXPECT_EQ(got.sets.seq_len, want->sets.seq_len) << what;
  EXPECT_EQ(got.sets.budget, want->sets.budget) << what;
  ASSERT_EQ(got.sets.indices.size(), want->sets.indices.size()) << what;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int heads_per_set = c.mode == SelectionMode::kBatchLevel ? n_q : c.group;
  int64_t differ = 0;
  for (int s = 0; s < got.sets.n_sets(); ++s) {
    auto a = got.sets.SetPositions(s), b = want->sets.SetPositions(s);
    std::vector<int32_t> diff;
    std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(diff));
    if (diff.empty()) continue;
    const int seq = s / got.sets.sets_per_seq, set = s % got.sets.sets_per_seq;
    const std::vector<double> comb = Combined(hq[seq], hk[seq], c.lens[seq], set, heads_per_set, c.group, scale);
    // The boundary: the smallest combined weight the CPU kept outside the sink.
    double boundary = INFINITY;
    for (int32_t p : b) {
      if (p >= c.sink) boundary = std::min(boundary, comb[p]);
    }
    for (int32_t p : diff) {
      ++differ;
      EXPECT_TRUE(p >= c.sink && std::fabs(comb[p] - boundary) <= 1e-5 * boundary)
          << what << ": set " << s << " differs at position " << p << " weight " << comb[p] << " boundary "
          << boundary << (c.ties ? " (exact ties must match)" : "");
    }
  }
  if (c.ties) {
    EXPECT_EQ(differ, 0) << what << ": exact ties must follow the lower-position rule";
  }
  ASSERT_EQ(got.captured_mass.size(), want->captured_mass.size());
  for (size_t i = 0; i < got.captured_mass.size(); ++i) {
    EXPECT_NEAR(got.captured_mass[i], want->captured_mass[i], 2e-4 + (differ > 0 ? 1e-3 : 0)) << what << " head " << i;
  }
}

TEST(CudaSelectionTest, MatchesCpuHeadLevel) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {128, 8, 4, 64, 1, SelectionMode::kHeadLevel, {2049, 17, 1, 300}});
  RunCase(*gpu, {128, 2, 8, 7, 3, SelectionMode::kHeadLevel, {17, 2049}});
  RunCase(*gpu, {64, 4, 1, 2048, 1, SelectionMode::kHeadLevel, {5000, 2048, 2047}});
  RunCase(*gpu, {128, 1, 4, 1, 1, SelectionMode::kHeadLevel, {9, 1}});
  RunCase(*gpu, {128, 8, 4, 513, 0, SelectionMode::kHeadLevel, {9000, 100, 700}, {0, 33, 701}});
}

TEST(CudaSelectionTest, MatchesCpuBatchLevelAndBf16) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {128, 4, 8, 129, 1, SelectionMode::kBatchLevel, {2049, 17, 1}});
  SelCase c{128, 8, 4, 255, 2, SelectionMode::kHeadLevel, {4097, 17, 1}};
  c.dtype = DType::kBF16;
  RunCase(*gpu, c);
}

// bf16 q and K with head_dim 64/128 and group <= 8 take the tensor-core score kernel; the others the
// CUDA-core one. Lengths cross the 256-key score chunks and the 16-key tiles at odd points.
TEST(CudaSelectionTest, Bf16TensorCorePathGqa148) {
  SPC_GPU_OR_SKIP(gpu);
  for (const auto& c : std::vector<SelCase>{
           {128, 8, 4, 2048, 1, SelectionMode::kHeadLevel, {8191, 2049, 17, 300}},
           {64, 4, 8, 257, 2, SelectionMode::kHeadLevel, {4099, 1, 258, 257}},
           {128, 2, 1, 1023, 1, SelectionMode::kHeadLevel, {3001, 1022, 1024}},
           {64, 8, 1, 33, 0, SelectionMode::kHeadLevel, {513, 40}, {7, 0}},
           {128, 4, 8, 129, 1, SelectionMode::kBatchLevel, {2049, 17, 1}},
           {128, 1, 2, 4096, 1, SelectionMode::kHeadLevel, {4097, 4095, 4096}},
       }) {
    SelCase b = c;
    b.dtype = DType::kBF16;
    RunCase(*gpu, b);
  }
}

// Past the shared-memory capacity of the top-B kernel (about 55K positions on an H100) the combined
// weights live in global memory.
TEST(CudaSelectionTest, LongContextGlobalPath) {
  SPC_GPU_OR_SKIP(gpu);
  SelCase c{64, 2, 4, 2047, 1, SelectionMode::kHeadLevel, {60001, 1000}};
  c.dtype = DType::kBF16;
  RunCase(*gpu, c);
  c.dtype = DType::kF32;
  c.mode = SelectionMode::kBatchLevel;
  RunCase(*gpu, c);
}

TEST(CudaSelectionTest, ExactTiesPickLowerPositions) {
  SPC_GPU_OR_SKIP(gpu);
  SelCase c{64, 2, 4, 100, 1, SelectionMode::kHeadLevel, {2049, 700}};
  c.ties = true;
  RunCase(*gpu, c);
  c.sink = 0;
  c.budget = 33;
  c.mode = SelectionMode::kBatchLevel;
  RunCase(*gpu, c);
  c.dtype = DType::kBF16;  // tensor-core scores: equal rows must still score exactly equal
  c.mode = SelectionMode::kHeadLevel;
  c.budget = 1000;
  RunCase(*gpu, c);
}

// Few sets and long contexts (benchmark 4's regime: one sequence, 8 sets, up to 40K positions), with sinks,
// budgets and lengths that differ in one batch (len < B, len <= sink, budget == sink, len 0), batch-level sets
// over all heads, and exact ties over long contexts.
TEST(CudaSelectionTest, FewSetsLongContexts) {
  SPC_GPU_OR_SKIP(gpu);
  std::vector<SelCase> cases = {
      {64, 8, 4, 2048, 1, SelectionMode::kHeadLevel, {16384}},
      {64, 8, 4, 2048, 4, SelectionMode::kHeadLevel, {32768}},
      {64, 8, 4, 2048, 17, SelectionMode::kHeadLevel, {40000}},
      {64, 8, 4, 2048, 1, SelectionMode::kHeadLevel, {30001, 2047, 0, 3}, {0, 0, 0, 0}},
      {64, 8, 4, 2048, 3, SelectionMode::kHeadLevel, {20000, 9000, 1025, 2, 5000}, {4096, 3, 1024, 3, 33}},
      {128, 8, 4, 2048, 1, SelectionMode::kHeadLevel, {24577, 16000}},
      {64, 8, 4, 1024, 2, SelectionMode::kBatchLevel, {36000, 500}},
      {128, 2, 8, 4095, 0, SelectionMode::kHeadLevel, {33333}},
  };
  for (SelCase c : cases) {
    c.dtype = DType::kBF16;
    RunCase(*gpu, c);
  }
  cases[3].dtype = DType::kF32;  // CUDA-core scores
  RunCase(*gpu, cases[3]);
}

TEST(CudaSelectionTest, ExactTiesLongContexts) {
  SPC_GPU_OR_SKIP(gpu);
  SelCase c{64, 8, 4, 2048, 1, SelectionMode::kHeadLevel, {20000, 5000}};
  c.ties = true;
  c.dtype = DType::kBF16;
  RunCase(*gpu, c);
  c.sink = 0;
  c.budget = 6000;
  c.mode = SelectionMode::kBatchLevel;
  RunCase(*gpu, c);
}

TEST(CudaSelectionTest, RejectsBadInput) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  auto q = *gpu->ToDevice(RandomHost({6, 64}, rng), DType::kF32, MemoryKind::kRetrieval);
  auto k = *gpu->ToDevice(RandomHost({4, 10, 64}, rng), DType::kF32, MemoryKind::kRetrieval);
  SelectionResult r;
  SelectionOptions opt;
  opt.budget = 4;
  std::vector<SelectionQuery> b{{q, k, 10, 0}};
  EXPECT_EQ(CudaSelectTopB(*gpu, b, opt, &r).code(), absl::StatusCode::kInvalidArgument);  // 6 % 4 != 0
  auto q2 = *gpu->ToDevice(RandomHost({8, 64}, rng), DType::kF32, MemoryKind::kRetrieval);
  b = {{q2, k, 11, 0}};
  EXPECT_EQ(CudaSelectTopB(*gpu, b, opt, &r).code(), absl::StatusCode::kInvalidArgument);  // len > capacity
  b = {{q2, k, 10, 0}};
  opt.budget = 0;
  EXPECT_EQ(CudaSelectTopB(*gpu, b, opt, &r).code(), absl::StatusCode::kInvalidArgument);  // budget 0
  opt.budget = 4;
  b = {{RandomHost({8, 64}, rng), k, 10, 0}};
  EXPECT_EQ(CudaSelectTopB(*gpu, b, opt, &r).code(), absl::StatusCode::kInvalidArgument);  // host q
  Tensor inf = RandomHost({8, 64}, rng);
  inf.as<float>()[5] = INFINITY;
  b = {{*gpu->ToDevice(inf, DType::kF32, MemoryKind::kRetrieval), k, 10, 0}};
  EXPECT_EQ(CudaSelectTopB(*gpu, b, opt, &r).code(), absl::StatusCode::kInvalidArgument);  // non-finite
  auto cpu = MakeCpuBackend();
  b = {{q2, k, 10, 0}};
  EXPECT_FALSE(CudaSelectTopB(*cpu, b, opt, &r).ok());  // not a CUDA backend
}

}  // namespace
}  // namespace specontext::testing
