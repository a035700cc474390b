// The deferred selection (Backend::StartSelectIndexSets / FinishSelectIndexSets, cuda_selection.cc): the same
// kernels as SelectIndexSets with the positions left on the device and brought down behind them, so the
// finished result must equal the waiting call's (positions and layout bit for bit, captured mass) on fresh
// random batches; a result that does not belong to the pending selection is refused, an unfinished selection
// is waited for by the next one, and finishing twice is harmless.
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/sparse/selection.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct Batch {
  std::vector<SelectionQuery> queries;
};

// n_q = n_kv * group query heads of head_dim `hd`, one sequence per length, bf16 on the GPU.
Batch RandomBatch(Backend& gpu, int n_kv, int group, int hd, const std::vector<int>& lens, std::mt19937& rng) {
  Batch b;
  for (int len : lens) {
    auto q = gpu.ToDevice(RandomHost({n_kv * group, hd}, rng, -2.0f, 2.0f), DType::kBF16, MemoryKind::kRetrieval);
    auto k = gpu.ToDevice(RandomHost({n_kv, len + 3, hd}, rng), DType::kBF16, MemoryKind::kRetrieval);
    EXPECT_TRUE(q.ok() && k.ok());
    b.queries.push_back({*q, *k, len, 0});
  }
  return b;
}

// Positions and layout bit for bit; the captured mass within float rounding (the top-B kernel sums it with
// shared-memory atomics, whose order varies from launch to launch).
void ExpectSame(const SelectionResult& a, const SelectionResult& b, const std::string& what) {
  EXPECT_EQ(a.sets.indptr, b.sets.indptr) << what;
  EXPECT_EQ(a.sets.seq_len, b.sets.seq_len) << what;
  EXPECT_EQ(a.sets.indices, b.sets.indices) << what;
  EXPECT_EQ(a.n_q_heads, b.n_q_heads) << what;
  ASSERT_EQ(a.captured_mass.size(), b.captured_mass.size()) << what;
  for (size_t i = 0; i < a.captured_mass.size(); ++i) {
    EXPECT_NEAR(a.captured_mass[i], b.captured_mass[i], 1e-5f) << what << " head " << i;
  }
}

TEST(CudaDeferredSelection, FinishedResultEqualsTheWaitingCall) {
  SPC_GPU_OR_SKIP(gpu);
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  struct Case {
    int n_kv, group, hd, budget, sink;
    SelectionMode mode;
    std::vector<int> lens;
  };
  for (const Case& c : std::vector<Case>{{8, 4, 64, 2048, 1, SelectionMode::kHeadLevel, {6000}},
                                         {8, 4, 128, 256, 2, SelectionMode::kHeadLevel, {3000, 17, 700, 257}},
                                         {2, 8, 64, 100, 0, SelectionMode::kBatchLevel, {1500, 99}},
                                         {4, 1, 128, 4096, 1, SelectionMode::kHeadLevel, {9000, 4096, 1}}}) {
    const std::string what = absl::StrCat("seed ", seed, " n_kv ", c.n_kv, " hd ", c.hd, " B ", c.budget);
    Batch b = RandomBatch(*gpu, c.n_kv, c.group, c.hd, c.lens, rng);
    SelectionOptions opt;
    opt.budget = c.budget;
    opt.sink = c.sink;
    opt.mode = c.mode;
    SelectionResult want, got;
    ASSERT_TRUE(gpu->SelectIndexSets(b.queries.data(), b.queries.size(), opt, &want).ok()) << what;
    EXPECT_FALSE(want.pending);
    got.sets.indices.assign(3, -5);  // stale content must be replaced
    ASSERT_TRUE(gpu->StartSelectIndexSets(b.queries.data(), b.queries.size(), opt, &got).ok()) << what;
    EXPECT_TRUE(got.pending) << what;
    // The layout is known at once; the positions are not read before the finish.
    EXPECT_EQ(got.sets.indptr, want.sets.indptr) << what;
    EXPECT_EQ(got.sets.indices.size(), want.sets.indices.size()) << what;
    ASSERT_TRUE(gpu->FinishSelectIndexSets(&got).ok()) << what;
    EXPECT_FALSE(got.pending);
    ExpectSame(got, want, what);
    EXPECT_TRUE(ValidateIndexSets(got.sets).ok()) << what;
    ASSERT_TRUE(gpu->FinishSelectIndexSets(&got).ok()) << "finishing twice is a no-op";
    ASSERT_TRUE(gpu->FinishSelectIndexSets(nullptr).ok());
  }
}

TEST(CudaDeferredSelection, ForeignResultsAndUnfinishedSelections) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  Batch big = RandomBatch(*gpu, 8, 4, 64, {5000, 3000}, rng);
  Batch small = RandomBatch(*gpu, 8, 4, 64, {400}, rng);
  SelectionOptions opt;
  opt.budget = 128;
  SelectionResult a, b, want_b;
  ASSERT_TRUE(gpu->StartSelectIndexSets(big.queries.data(), big.queries.size(), opt, &a).ok());
  // A result of another shape claiming to be pending is not this selection's.
  SelectionResult foreign;
  foreign.pending = true;
  foreign.sets.indices.resize(7);
  const absl::Status st = gpu->FinishSelectIndexSets(&foreign);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  // A new selection while `a` is unfinished: the backend waits for `a`'s copies first; `b` finishes normally.
  ASSERT_TRUE(gpu->StartSelectIndexSets(small.queries.data(), small.queries.size(), opt, &b).ok());
  ASSERT_TRUE(gpu->FinishSelectIndexSets(&b).ok());
  ASSERT_TRUE(gpu->SelectIndexSets(small.queries.data(), small.queries.size(), opt, &want_b).ok());
  ExpectSame(b, want_b, "second selection");
  // `a` can no longer be finished (its buffers were reused): refused, not garbage.
  const absl::Status late = gpu->FinishSelectIndexSets(&a);
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition) << late;
}

}  // namespace
}  // namespace specontext::testing
