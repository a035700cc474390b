// SpeContext sparse decoding under tensor parallelism on the CPU backend (core/model/sparse_tensor_parallel.h):
// one thread per rank, each with its own backend, model shard, SparseDecoder (replicated `layer` retrieval
// head, its own KV tiers, slot buffers and elastic loads), joined by the in-process communicator. Against the
// unsharded sparse decoder, over a ragged batch (three sequences of different prompt lengths and budgets, one
// admitted while the others decode) with budgets well below the pasts: logits within 1e-4 relative, the same
// greedy tokens, every rank's logits bit-identical, and each rank's index sets equal to the unsharded sets of
// its KV heads. Covered: head- and batch-level selection, layer and eagle3 heads (the eagle3 head reads the
// target's hidden states, which TP reproduces within f32 rounding: its sets match here because no score is
// that close to a tie), the window and oracle sources, layers offloaded from the start
// (elastic loads on every rank) and planner-driven layer moves under different per-rank memory limits (the
// ranks agree on every move), the weak-retrieval fallback (decided from every rank's heads). Refusals: options
// that would depend on heads a rank does not hold.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "tests/sparse_engine/tensor_parallel_sparse_harness.h"

namespace specontext {
namespace {

using testing::ExpectRankSets;
using testing::RunSparseTpRank;
using testing::SparseTpFiles;
using testing::SparseTpSetup;
using testing::SparseTpTrace;
using testing::Stories260kShapedFiles;
using testing::TinyGqaFiles;
using Files = SparseTpFiles;
using RunSetup = SparseTpSetup;
using Trace = SparseTpTrace;

absl::StatusOr<Trace> RunRank(const Checkpoint& ck, const RetrievalHead* head, const TensorParallel& tp,
                              const RunSetup& setup) {
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  return RunSparseTpRank(ck, head, backend.get(), tp, setup);
}

// One CPU backend per rank joined by the in-process group.
std::vector<absl::StatusOr<Trace>> RunTensorParallel(const Checkpoint& ck, const RetrievalHead* head, int size,
                                                     const RunSetup& setup) {
  std::vector<std::unique_ptr<Backend>> owned;
  std::vector<Backend*> backends;
  for (int r = 0; r < size; ++r) {
    owned.push_back(MakeCpuBackend());
    backends.push_back(owned.back().get());
  }
  return testing::RunSparseTpRanks(ck, head, backends, CreateInProcessGroup(size), setup);
}

void ExpectMatchesUnsharded(const Files& files, int size, const RunSetup& setup) {
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(files.model);
  ASSERT_TRUE(ck.ok()) << ck.status();
  std::unique_ptr<RetrievalHead> head;
  if (setup.options.source == SelectionSource::kHead) {
    auto h = RetrievalHead::Load(files.head, ck->config, ck->weights.get());
    ASSERT_TRUE(h.ok()) << h.status();
    head = *std::move(h);
  }
  RunSetup ref_setup = setup;
  // The reference keeps every layer resident: moves must not change outputs. Except with the weak-retrieval
  // fallback, which reads every past position in the resident layers only: there the reference offloads too.
  if (setup.options.fallback_mass == 0) ref_setup.offload_to = -1;
  ref_setup.limit_rows.clear();
  absl::StatusOr<Trace> ref = RunRank(*ck, head.get(), {}, ref_setup);
  ASSERT_TRUE(ref.ok()) << ref.status();
  ASSERT_GT(ref->stats.sparse_steps, 0);
  auto ranks = RunTensorParallel(*ck, head.get(), size, setup);
  for (int r = 0; r < size; ++r) ASSERT_TRUE(ranks[r].ok()) << "rank " << r << ": " << ranks[r].status();
  const Trace& tp = *ranks[0];
  ASSERT_EQ(tp.tokens, ref->tokens) << "TP " << size << " greedy tokens differ";
  ASSERT_EQ(tp.logits.size(), ref->logits.size());
  for (size_t k = 0; k < ref->logits.size(); ++k) {
    for (size_t i = 0; i < ref->logits[k].size(); ++i) {
      const float want = ref->logits[k][i], got = tp.logits[k][i];
      ASSERT_TRUE(std::isfinite(got)) << "row " << k << " logit " << i;
      ASSERT_LE(std::fabs(got - want) / (1 + std::fabs(want)), 1e-4f)
          << "TP " << size << " row " << k << " logit " << i << ": " << got << " vs " << want;
    }
  }
  bool pruned = false;
  for (int r = 0; r < size; ++r) {
    const Trace& t = *ranks[r];
    EXPECT_EQ(t.logits, tp.logits) << "rank " << r << " computed other logits than rank 0";
    EXPECT_EQ(t.gpu_layers, tp.gpu_layers) << "rank " << r << " kept other layers resident than rank 0";
    EXPECT_EQ(t.stats.sparse_steps, ref->stats.sparse_steps) << "rank " << r;
    EXPECT_EQ(t.stats.weak_retrieval_fallback_steps, ref->stats.weak_retrieval_fallback_steps) << "rank " << r;
    EXPECT_EQ(t.stats.weak_retrieval_fallback_sequences, ref->stats.weak_retrieval_fallback_sequences)
        << "rank " << r;
    for (size_t step = 0; step < ref->sets.size(); ++step) {
      ExpectRankSets(ref->sets[step], t.sets[step], r, size, static_cast<int>(step));
      const IndexSets& s = t.sets[step];
      for (int32_t q = 0; q < s.n_seqs; ++q) pruned = pruned || s.Positions(q, 0).size() < size_t(s.seq_len[q]);
    }
    if (setup.offload_to >= 0 || !setup.limit_rows.empty()) {
      EXPECT_GT(t.stats.elastic.rows_loaded, 0) << "rank " << r << " loaded nothing";
    }
  }
  EXPECT_TRUE(pruned) << "no set was smaller than its past: selection did not prune";
}

struct Case {
  std::string name;
  bool stories;  // the stories260K-shaped model (4 KV heads); else tiny-llama-tied-gqa (2 KV heads)
  int size;
  SelectionMode mode = SelectionMode::kHeadLevel;
  SelectionSource source = SelectionSource::kHead;
  int32_t offload_to = -1;
  bool eagle3 = false;  // a random eagle3 head (4 query heads, fed the target's hidden states) for the layer head
};

class SparseTensorParallel : public ::testing::TestWithParam<Case> {};

TEST_P(SparseTensorParallel, MatchesUnshardedSparse) {
  const Case& c = GetParam();
  absl::StatusOr<Files> files = c.stories ? Stories260kShapedFiles() : TinyGqaFiles();
  ASSERT_TRUE(files.ok()) << files.status();
  if (c.eagle3) {
    absl::StatusOr<Checkpoint> ck = OpenCheckpoint(files->model);
    ASSERT_TRUE(ck.ok()) << ck.status();
    files->head = testing::WriteRandomEagle3Head(ck->config, 5, c.name + "_eagle3");
    ASSERT_FALSE(files->head.empty());
  }
  RunSetup setup;
  setup.options.budget = 6;
  setup.options.mode = c.mode;
  setup.options.source = c.source;
  setup.offload_to = c.offload_to;
  ExpectMatchesUnsharded(*files, c.size, setup);
}

INSTANTIATE_TEST_SUITE_P(
    Tp, SparseTensorParallel,
    ::testing::Values(Case{"tiny_gqa_tp2", false, 2}, Case{"tiny_gqa_tp2_offloaded", false, 2,
                                                           SelectionMode::kHeadLevel, SelectionSource::kHead, 1},
                      Case{"stories_tp2", true, 2}, Case{"stories_tp4", true, 4},
                      Case{"stories_tp4_offloaded", true, 4, SelectionMode::kHeadLevel, SelectionSource::kHead, 2},
                      Case{"stories_tp2_batch_level_offloaded", true, 2, SelectionMode::kBatchLevel,
                           SelectionSource::kHead, 3},
                      Case{"stories_tp4_window_offloaded", true, 4, SelectionMode::kHeadLevel,
                           SelectionSource::kWindow, 3},
                      Case{"stories_tp2_oracle", true, 2, SelectionMode::kHeadLevel, SelectionSource::kOracle},
                      Case{"stories_tp4_eagle3_offloaded", true, 4, SelectionMode::kHeadLevel, SelectionSource::kHead,
                           3, true}),
    [](const auto& info) { return info.param.name; });

TEST(SparseTensorParallelPlanner, RanksAgreeOnLayerMoves) {
  // Rank 0 may keep ~120 rows of every layer resident (all it needs), the others ~56: without agreement rank 0 would move
  // layers later than the rest. Sequences grow in chunks of 4 rows, so the planner moves layers mid-run.
  absl::StatusOr<Files> files = Stories260kShapedFiles();
  ASSERT_TRUE(files.ok()) << files.status();
  for (int size : {2, 4}) {
    SCOPED_TRACE(size);
    RunSetup setup;
    setup.options.budget = 6;
    setup.options.kv_grow_rows = 4;
    setup.limit_rows.assign(size, 56);
    setup.limit_rows[0] = 120;
    ExpectMatchesUnsharded(*files, size, setup);
  }
}

TEST(SparseTensorParallelPlanner, AgreeOnGpuLayersTakesTheSmallestAndSharesErrors) {
  constexpr int kRanks = 3;
  auto comms = CreateInProcessGroup(kRanks);
  std::vector<absl::StatusOr<int32_t>> got(kRanks, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      std::unique_ptr<Backend> b = MakeCpuBackend();
      Tensor scratch;
      absl::StatusOr<int32_t> mine = r == 1 ? absl::StatusOr<int32_t>(absl::ResourceExhaustedError("full"))
                                            : absl::StatusOr<int32_t>(2);
      got[r] = AgreeOnGpuLayers(*comms[r], *b, mine, &scratch);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_TRUE(absl::IsResourceExhausted(got[r].status())) << "rank " << r << ": " << got[r].status();
  }
  EXPECT_EQ(got[1].status().message(), "full");
  EXPECT_NE(got[0].status().message().find("rank 1"), std::string::npos) << got[0].status();
  // Without errors every rank gets the smallest.
  auto again = CreateInProcessGroup(kRanks);
  threads.clear();
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      std::unique_ptr<Backend> b = MakeCpuBackend();
      Tensor scratch;
      got[r] = AgreeOnGpuLayers(*again[r], *b, 5 - r, &scratch);
      if (got[r].ok()) got[r] = AgreeOnGpuLayers(*again[r], *b, *got[r] + r, &scratch);  // 3, 4, 5: reused
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_TRUE(got[r].ok()) << got[r].status();
    EXPECT_EQ(*got[r], 3);
  }
}

// The weak-retrieval fallback under TP: the ranks add their query heads' captured mass (one all-reduce per
// step) and take the unsharded decoder's per-sequence decisions. The threshold comes from the TP 1 run
// without the fallback (the middle of the first gap of at least 1e-3 between its sorted masses from the
// median up) so that some but not all sequences fall back; TP 2 and 4 then match TP 1 with the same threshold (logits, tokens,
// sets, and every rank's fallback counters equal to TP 1's), with every layer resident and with layers
// offloaded (the reference offloads the same layers: the fallback attends densely in resident layers only).
TEST(SparseTensorParallelFallback, RanksTakeTheUnshardedDecisions) {
  absl::StatusOr<Files> files = Stories260kShapedFiles();
  ASSERT_TRUE(files.ok()) << files.status();
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(files->model);
  ASSERT_TRUE(ck.ok()) << ck.status();
  auto head = RetrievalHead::Load(files->head, ck->config, ck->weights.get());
  ASSERT_TRUE(head.ok()) << head.status();
  for (SelectionMode mode : {SelectionMode::kHeadLevel, SelectionMode::kBatchLevel}) {
    for (int32_t offload_to : {-1, 2}) {
      SCOPED_TRACE(absl::StrCat(mode == SelectionMode::kHeadLevel ? "head" : "batch", "-level, offload to ",
                                offload_to));
      RunSetup setup;
      setup.options.budget = 6;
      setup.options.mode = mode;
      setup.offload_to = offload_to;
      std::vector<float> masses;
      setup.options.recall_observer = [&](const AttentionRecallStep& r) {
        masses.insert(masses.end(), r.head_mass.begin(), r.head_mass.end());
      };
      ASSERT_TRUE(RunRank(*ck, head->get(), {}, setup).ok());
      std::sort(masses.begin(), masses.end());
      ASSERT_GE(masses.size(), 8u);
      // The first gap of at least 1e-3 from the median up: a margin far above the rounding of the ranks' f32
      // sums, and a threshold amid the masses, where one rank's heads alone would often decide otherwise.
      double threshold = 0;
      for (size_t i = masses.size() / 2; i + 1 < masses.size() && threshold == 0; ++i) {
        if (masses[i + 1] - masses[i] >= 1e-3f) threshold = (static_cast<double>(masses[i]) + masses[i + 1]) / 2;
      }
      ASSERT_GT(threshold, 0) << "no threshold separates the sequences' captured masses";
      // TP 1 with the fallback: some sequence-steps fall back, not all.
      setup.options.fallback_mass = threshold;
      int64_t seq_steps = 0, weak = 0;
      setup.options.recall_observer = [&](const AttentionRecallStep& r) {
        if (r.dense) return;
        seq_steps += static_cast<int64_t>(r.fallback.size());
        for (uint8_t f : r.fallback) weak += f;
      };
      absl::StatusOr<Trace> one = RunRank(*ck, head->get(), {}, setup);
      ASSERT_TRUE(one.ok()) << one.status();
      EXPECT_EQ(one->stats.weak_retrieval_fallback_sequences, weak);
      EXPECT_GT(weak, 0) << "threshold " << threshold;
      EXPECT_LT(weak, seq_steps) << "threshold " << threshold;
      setup.options.recall_observer = nullptr;
      for (int size : {2, 4}) {
        SCOPED_TRACE(absl::StrCat("TP ", size));
        ExpectMatchesUnsharded(*files, size, setup);
      }
    }
  }
}

TEST(SparseTensorParallel, RefusesOptionsThatDependOnOtherRanksHeads) {
  absl::StatusOr<Files> files = TinyGqaFiles();
  ASSERT_TRUE(files.ok()) << files.status();
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(files->model);
  ASSERT_TRUE(ck.ok()) << ck.status();
  auto head = RetrievalHead::Load(files->head, ck->config, ck->weights.get());
  ASSERT_TRUE(head.ok()) << head.status();
  auto comms = CreateInProcessGroup(2);
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  auto model = Transformer::Load(*ck, backend.get(), {}, {0, 2, comms[0].get()});
  ASSERT_TRUE(model.ok()) << model.status();
  auto expect_refused = [&](const SparseOptions& o, const RetrievalHead* h, const std::string& what) {
    auto d = SparseDecoder::Create(model->get(), h, o);
    ASSERT_TRUE(absl::IsInvalidArgument(d.status())) << what << ": " << d.status();
    EXPECT_NE(d.status().message().find("tensor parallelism"), std::string::npos) << d.status();
    EXPECT_NE(d.status().message().find(what), std::string::npos) << d.status();
  };
  SparseOptions o;
  o.recall_observer = [](const AttentionRecallStep&) {};
  expect_refused(o, head->get(), "recall probe");
  o = {};
  o.synthetic_overlap = 0.5;
  expect_refused(o, head->get(), "synthetic overlap");
  o = {};
  o.source = SelectionSource::kQuest;
  o.mode = SelectionMode::kBatchLevel;
  expect_refused(o, nullptr, "batch-level");
  o = {};
  EXPECT_TRUE(SparseDecoder::Create(model->get(), head->get(), o).ok()) << "plain head-level selection is supported";
  o.fallback_mass = 0.5;
  EXPECT_TRUE(SparseDecoder::Create(model->get(), head->get(), o).ok()) << "the weak-retrieval fallback is supported";
}

}  // namespace
}  // namespace specontext
