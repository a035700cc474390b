// The evaluation runs through the Engine on a tiny random checkpoint with a `layer` retrieval head: batched
// runs equal single runs, a budget above every sequence equals dense decoding, the overlap recorder follows
// each request's sets (SparseDecoder::last_set_ids), fidelity of dense against itself never diverges; and the
// metrics' arithmetic on hand-made inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "core/eval/batch_runner.h"
#include "core/eval/distribution.h"
#include "core/eval/fidelity.h"
#include "core/eval/overlap_recorder.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext {
namespace {

using testing::LoadTiny;
using testing::RandomPrompt;
using testing::Tiny;

TEST(EvalMetrics, Distribution) {
  const std::vector<double> v = {4, 1, 3, 2};
  EXPECT_DOUBLE_EQ(Quantile(v, 0.5), 2.5);
  EXPECT_DOUBLE_EQ(Quantile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Quantile(v, 1), 4);
  EXPECT_DOUBLE_EQ(Quantile(v, 0.25), 1.75);
  EXPECT_DOUBLE_EQ(Mean(v), 2.5);
  EXPECT_EQ(Quantile({}, 0.5), 0);
  EXPECT_EQ(Histogram(std::vector<double>{0, 0.05, 0.5, 0.99, 1.0, 1.5, -1}, 0, 1, 10),
            (std::vector<int64_t>{3, 0, 0, 0, 0, 1, 0, 0, 0, 3}));
}

TEST(EvalMetrics, SequenceMetrics) {
  const std::vector<int32_t> a = {1, 2, 3, 4}, b = {1, 2, 9, 4}, c = {1, 2};
  EXPECT_EQ(FirstDivergence(a, a), -1);
  EXPECT_EQ(FirstDivergence(a, b), 2);
  EXPECT_EQ(FirstDivergence(a, c), 2);
  EXPECT_EQ(FirstDivergence(std::vector<int32_t>{}, a), 0);
  EXPECT_DOUBLE_EQ(DistinctNgramRatio(a, 4), 1.0);
  EXPECT_DOUBLE_EQ(DistinctNgramRatio(std::vector<int32_t>{5, 5, 5, 5, 5, 5}, 4), 1.0 / 3);
  EXPECT_DOUBLE_EQ(DistinctNgramRatio(c, 4), 1.0);
  const std::vector<float> logits = {0, std::log(3.0f)};  // p = 1/4, 3/4
  EXPECT_NEAR(TokenNll(logits, 0), std::log(4.0), 1e-6);
  EXPECT_NEAR(TokenNll(logits, 1), std::log(4.0 / 3), 1e-6);
  EXPECT_TRUE(std::isinf(TokenNll(logits, 2)));
}

// Two sequences with two sets each (head-level), laid out as the selection emits them.
IndexSets Sets(std::vector<int32_t> seq_len, const std::vector<std::vector<int32_t>>& sets) {
  IndexSets s;
  s.Reset(static_cast<int32_t>(seq_len.size()), 2, 2, 4);
  s.seq_len = std::move(seq_len);
  s.indptr = {0};
  for (const auto& set : sets) {
    s.indices.insert(s.indices.end(), set.begin(), set.end());
    s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
  }
  return s;
}

TEST(EvalMetrics, OverlapRecorderFollowsEachRequest) {
  OverlapRecorder rec;
  const std::vector<uint64_t> ids = {7, 9};
  rec.Observe(Sets({10, 3}, {{0, 2, 5, 9}, {0, 1, 2, 3}, {0, 1, 2}, {0, 1, 2}}), ids);
  EXPECT_TRUE(rec.samples().empty());  // no previous sets yet
  // Request 9 comes first now. Request 7 keeps 3 of 4 positions in each set; request 9 holds every past
  // token (4 of 4: nothing was chosen), which gives no sample.
  rec.Observe(Sets({4, 11}, {{0, 1, 2, 3}, {0, 1, 2, 3}, {0, 2, 5, 10}, {0, 1, 2, 9}}), std::vector<uint64_t>{9, 7});
  ASSERT_EQ(rec.samples().size(), 1u);
  EXPECT_DOUBLE_EQ(rec.samples()[0], 6.0 / 8);
  // Request 7 skips a step (11 -> 13): no sample for it; request 9 now chose (4 of 5) and kept all 8.
  rec.Observe(Sets({5, 13}, {{0, 1, 2, 3}, {0, 1, 2, 3}, {0, 2, 5, 10}, {0, 1, 2, 9}}), std::vector<uint64_t>{9, 7});
  ASSERT_EQ(rec.samples().size(), 2u);
  EXPECT_DOUBLE_EQ(rec.samples()[1], 1.0);
  rec.Observe(Sets({6, 14}, {{0, 1, 2, 3}, {0, 1, 2, 3}, {0, 2, 5, 10}, {0, 1, 2, 9}}), std::vector<uint64_t>{9, 7});
  ASSERT_EQ(rec.samples().size(), 4u);  // both: 7 has its sets of step 13 again
  EXPECT_DOUBLE_EQ(rec.samples()[3], 1.0);
  rec.Forget(7);
  rec.Observe(Sets({7, 15}, {{0, 1, 2, 3}, {0, 1, 2, 3}, {0, 2, 5, 10}, {0, 1, 2, 9}}), std::vector<uint64_t>{9, 7});
  EXPECT_EQ(rec.samples().size(), 5u);  // 7 was forgotten: only 9's sample
}

class EvalRunsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = LoadTiny(/*seed=*/11);
    ASSERT_TRUE(t.ok()) << t.status();
    tiny_ = *std::move(t);
    const int64_t vocab = tiny_->checkpoint.config.vocab_size;
    for (int i = 0; i < 5; ++i) prompts_.push_back(RandomPrompt(12 + 9 * i, vocab, 100 + i));
  }
  std::shared_ptr<SparseDecoder> Decoder() {
    SparseOptions so;
    so.budget = 64;
    auto d = SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), so);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::shared_ptr<SparseDecoder>(*std::move(d)) : nullptr;
  }
  // Greedy tokens of every prompt under `setting`, `in_flight` at once.
  std::vector<std::vector<int32_t>> Run(BatchRunner& runner, const EvalSetting& setting, int32_t in_flight,
                                        BatchRunStats* stats = nullptr) {
    std::vector<GenerationRequest> reqs;
    for (const auto& p : prompts_) {
      EvalTask task;
      task.max_new_tokens = 20;
      reqs.push_back(TaskRequest(task, p, setting));
    }
    std::vector<std::vector<int32_t>> out(prompts_.size());
    auto run = runner.Run(
        std::move(reqs), in_flight, [](size_t i) { return std::to_string(i); },
        [&](size_t i, BatchOutcome o) { out[i] = std::move(o.tokens); });
    EXPECT_TRUE(run.ok()) << run.status();
    if (run.ok() && stats != nullptr) *stats = *run;
    return out;
  }
  std::unique_ptr<Tiny> tiny_;
  std::vector<std::vector<int32_t>> prompts_;
};

TEST_F(EvalRunsTest, BatchedEqualsSingleAndLargeBudgetEqualsDense) {
  Engine dense_engine(tiny_->model.get(), nullptr, EngineOptions{});
  BatchRunner dense_runner(&dense_engine, nullptr);
  const auto dense = Run(dense_runner, EvalSetting{}, 4);
  EXPECT_EQ(Run(dense_runner, EvalSetting{}, 1), dense);

  std::shared_ptr<SparseDecoder> dec = Decoder();
  ASSERT_NE(dec, nullptr);
  EngineOptions eo;
  eo.max_batch = 3;
  eo.sparse = dec;
  Engine engine(tiny_->model.get(), nullptr, eo);
  BatchRunner runner(&engine, dec.get());
  // The dense setting of the sparse engine, and a budget above every sequence (at most 48 + 20 tokens).
  BatchRunStats st;
  EXPECT_EQ(Run(runner, EvalSetting{}, 5, &st), dense);
  EXPECT_EQ(st.sparse_steps, 0);
  EXPECT_TRUE(st.overlap.empty());
  EXPECT_EQ(Run(runner, EvalSetting{false, 80}, 5, &st), dense);
  EXPECT_EQ(st.sparse_steps, 0);

  // A small budget: the sparse path, the same tokens batched or one by one, and one overlap sample per
  // request and step after its first sparse step.
  const auto sparse = Run(runner, EvalSetting{false, 6}, 5, &st);
  EXPECT_GT(st.sparse_steps, 0);
  EXPECT_EQ(static_cast<int64_t>(st.overlap.size()), 5 * (20 - 2));
  for (double x : st.overlap) {
    EXPECT_GE(x, 0.0);
    EXPECT_LE(x, 1.0);
  }
  EXPECT_EQ(Run(runner, EvalSetting{false, 6}, 1, &st), sparse);
  EXPECT_EQ(static_cast<int64_t>(st.overlap.size()), 5 * (20 - 2));
  EXPECT_EQ(dec->last_set_ids().size(), 1u);  // the last step decoded the last request alone
}

TEST_F(EvalRunsTest, FidelityOfDenseAgainstItselfNeverDiverges) {
  std::shared_ptr<SparseDecoder> dec = Decoder();
  ASSERT_NE(dec, nullptr);
  EngineOptions eo;
  eo.sparse = dec;
  Engine engine(tiny_->model.get(), nullptr, eo);
  BatchRunner runner(&engine, dec.get());
  const std::vector<int32_t> new_tokens(prompts_.size(), 30);
  FidelityRun run(&runner, prompts_, new_tokens, /*ignore_eos=*/true, 4, [](size_t i) { return std::to_string(i); });
  size_t refs = 0;
  ASSERT_TRUE(run.RunReferences([&](size_t) { ++refs; }).ok());
  EXPECT_EQ(refs, prompts_.size());
  for (const EvalSetting& s : {EvalSetting{}, EvalSetting{false, 80}, EvalSetting{false, 4}}) {
    std::vector<FidelityResult> results;
    ASSERT_TRUE(run.Compare(s, [&](FidelityResult r) { results.push_back(std::move(r)); }).ok());
    ASSERT_EQ(results.size(), prompts_.size());
    for (const FidelityResult& r : results) {
      const FidelityReference& ref = run.references()[r.prompt];
      ASSERT_EQ(ref.nll.size(), 30u);
      EXPECT_EQ(r.compared_tokens, 30);
      EXPECT_GT(r.nll_reference, 0);
      if (s.dense || s.budget == 80) {  // exact: the same tokens and the same NLL
        EXPECT_EQ(r.first_divergence, -1);
        EXPECT_EQ(r.candidate.tokens, ref.tokens);
        EXPECT_DOUBLE_EQ(r.nll_candidate, r.nll_reference);
        EXPECT_DOUBLE_EQ(r.candidate_dense_argmax, 1.0);
      } else if (r.first_divergence >= 0) {
        // Up to the divergence the candidate is the dense argmax; at it, it is not.
        EXPECT_LT(r.candidate_dense_argmax, 1.0);
        EXPECT_GE(r.nll_candidate, 0);
      }
      EXPECT_DOUBLE_EQ(r.distinct4_reference, DistinctNgramRatio(ref.tokens, 4));
    }
    // Budget 4 of up to 78 tokens changes this random model's greedy path somewhere (the metric can fail).
    const auto diverged = std::count_if(results.begin(), results.end(), [](const auto& r) { return r.first_divergence >= 0; });
    if (!s.dense && s.budget == 4) EXPECT_GT(diverged, 0);
  }
}

}  // namespace
}  // namespace specontext
