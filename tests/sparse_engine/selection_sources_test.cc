// Selection sources, the attention recall probe and the weak-retrieval fallback through the
// engine's decode path on the CPU backend (SparseDecoder, Transformer, CpuBackend):
//   - the backend's per-layer oracle sets equal a brute-force top-B of the softmax weights (max
//   over the GQA
//     group, sink kept), and its quest sets QuestSelectTopB's with the current token's key row
//     (itself checked against brute force in tests/sparse), on random KV at odd sizes; offloaded
//     layers are refused;
//   - on a tiny random model, every decode step's probed recall (each layer and query head) and
//   logits equal
//     a brute-force decode written from the definitions (reference_decode.h), for head, window,
//     oracle and quest; recall is 1 when the budget covers the past (dense steps, and sparse steps
//     over full sets with layers offloaded);
//   - window sets through the Engine are exactly sink + most recent, offloaded or not; oracle with
//   offloaded
//     layers fails with a clear message; the fallback triggers, is counted and gives the dense
//     tokens.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/cpu/cpu_backend.h"
#include "core/model/engine.h"
#include "core/sparse/quest.h"
#include "core/sparse/selection_source.h"
#include "tests/sparse_engine/reference_decode.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext {
namespace {

using testing::Greedy;
using testing::LoadTiny;
using testing::RandomF32;
using testing::RandomPrompt;
using testing::ReferenceDecoder;
using testing::ReferenceSets;
using testing::ReferenceStep;
using testing::Tiny;

// Brute-force oracle of KV head g: softmax weights of each query head of the group over [0, past)
// (double), element-wise max, the first min(sink, k) positions, then the largest weights (ties:
// lower position).
std::vector<int32_t> BruteOracle(const float* q, int64_t n_heads, const Tensor& k, int64_t g,
                                 int32_t past, int32_t budget, int32_t sink) {
  const int64_t n_kv = k.dim(0), rows = k.dim(1), hd = k.dim(2), group = n_heads / n_kv;
  std::vector<double> comb(past, 0.0);
  for (int64_t j = g * group; j < (g + 1) * group; ++j) {
    std::vector<double> s(past);
    double mx = -INFINITY, sum = 0;
    for (int32_t t = 0; t < past; ++t) {
      double d = 0;
      for (int64_t e = 0; e < hd; ++e)
        d += double(q[j * hd + e]) * k.as<float>()[(g * rows + t) * hd + e];
      mx = std::max(mx, s[t] = d / std::sqrt(double(hd)));
    }
    for (double v : s) sum += std::exp(v - mx);
    for (int32_t t = 0; t < past; ++t) comb[t] = std::max(comb[t], std::exp(s[t] - mx) / sum);
  }
  const int32_t kk = std::min(budget, past), keep = std::min(sink, kk);
  std::vector<int32_t> out(keep), rest(past - keep);
  std::iota(out.begin(), out.end(), 0);
  std::iota(rest.begin(), rest.end(), keep);
  std::stable_sort(rest.begin(), rest.end(),
                   [&](int32_t a, int32_t b) { return comb[a] > comb[b]; });
  out.insert(out.end(), rest.begin(), rest.begin() + (kk - keep));
  std::sort(out.begin(), out.end());
  return out;
}

TEST(LayerSelectionOpsTest, OracleAndQuestMatchBruteForceOnRandomKv) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 rng(seed);
  const int n_layers = 2, n_kv = 2, group = 3, n_q = n_kv * group, hd = 12, sink = 2;
  const std::vector<int32_t> lens = {37, 90, 3}, budgets = {8, 20, 8};
  std::unique_ptr<Backend> b = MakeCpuBackend();
  auto* cpu = static_cast<CpuBackend*>(b.get());
  std::vector<SequenceKv> kvs(lens.size());
  BatchDesc batch;
  for (size_t i = 0; i < lens.size(); ++i) {
    kvs[i].capacity = lens[i] + 5;
    for (int l = 0; l < n_layers; ++l) {
      kvs[i].k.push_back(RandomF32(rng, {n_kv, lens[i] + 5, hd}, 1.0f));
      kvs[i].v.push_back(RandomF32(rng, {n_kv, lens[i] + 5, hd}, 1.0f));
    }
    batch.seqs.push_back({static_cast<int32_t>(i), 1, lens[i]});
    batch.kv.push_back(&kvs[i]);
  }
  batch.n_tokens = static_cast<int32_t>(lens.size());
  Tensor q = RandomF32(rng, {static_cast<int64_t>(lens.size()), n_q, hd}, 1.5f);
  for (SelectionMode mode : {SelectionMode::kHeadLevel, SelectionMode::kBatchLevel}) {
    const int32_t sets_per_seq = mode == SelectionMode::kHeadLevel ? n_kv : 1;
    IndexSets layout;
    WindowIndexSets(lens, budgets, n_kv, sets_per_seq, sink, &layout);
    for (int l = 0; l < n_layers; ++l) {
      ASSERT_TRUE(b->PrepareBatch(batch).ok());
      SparseDecodeDesc desc;
      desc.sets = &layout;
      ASSERT_TRUE(b->PrepareSparseDecode(desc).ok());
      LayerSelectionSpec spec;
      spec.sink = sink;
      spec.mode = mode;
      ASSERT_TRUE(b->SelectLayerIndexSets(l, q, spec).ok());
      const IndexSets oracle = cpu->prepared_sparse_sets();
      spec.source = SelectionSource::kQuest;
      ASSERT_TRUE(b->SelectLayerIndexSets(l, q, spec).ok());
      const IndexSets quest = cpu->prepared_sparse_sets();
      ASSERT_TRUE(ValidateIndexSets(oracle).ok() && ValidateIndexSets(quest).ok());
      std::vector<SelectionQuery> sq;
      for (size_t i = 0; i < lens.size(); ++i) {
        sq.push_back({Tensor(q.as<float>() + i * n_q * hd, DType::kF32, {n_q, hd}), kvs[i].k[l],
                      lens[i], budgets[i]});
      }
      SelectionOptions so;
      so.budget = 20;
      so.sink = sink;
      so.mode = mode;
      IndexSets want_quest;
      ASSERT_TRUE(QuestSelectTopB(sq, so, kQuestPageSize, /*with_current=*/true, &want_quest).ok());
      EXPECT_EQ(quest.indices, want_quest.indices) << "seed " << seed;
      for (size_t i = 0; i < lens.size(); ++i) {
        if (mode == SelectionMode::kBatchLevel) continue;  // brute force below is per KV head
        for (int g = 0; g < n_kv; ++g) {
          auto got = oracle.Positions(static_cast<int32_t>(i), g);
          EXPECT_EQ(std::vector<int32_t>(got.begin(), got.end()),
                    BruteOracle(q.as<float>() + i * n_q * hd, n_q, kvs[i].k[l], g, lens[i],
                                budgets[i], sink))
              << "seed " << seed << " layer " << l << " seq " << i << " head " << g;
        }
      }
    }
  }
  // A layer in host memory is refused; so is a mode that does not match the prepared sets.
  Tensor host = RandomF32(rng, {n_kv, 100, hd}, 1.0f);
  kvs[0].host_k = {Tensor(), host};
  ASSERT_TRUE(b->PrepareBatch(batch).ok());
  IndexSets layout;
  WindowIndexSets(lens, budgets, n_kv, n_kv, sink, &layout);
  SparseDecodeDesc desc;
  desc.sets = &layout;
  ASSERT_TRUE(b->PrepareSparseDecode(desc).ok());
  LayerSelectionSpec spec;
  EXPECT_EQ(b->SelectLayerIndexSets(1, q, spec).code(), absl::StatusCode::kFailedPrecondition);
  spec.mode = SelectionMode::kBatchLevel;
  EXPECT_EQ(b->SelectLayerIndexSets(0, q, spec).code(), absl::StatusCode::kInvalidArgument);
}

// Teacher-forced decode of `tokens` after `prompt` through `dec` (driven directly, so the test
// holds the sequence's KV), comparing every step with the reference decode: K row, logits and each
// layer's and query head's recall. `sets` gives the positions the reference attends to.
void CheckAgainstReference(
    Tiny& t, SparseDecoder& dec, const AttentionRecallStep& last, int32_t budget,
    const std::function<ReferenceSets(const SequenceKv&, int32_t past)>& sets) {
  auto ref = ReferenceDecoder::Create(t.checkpoint);
  ASSERT_TRUE(ref.ok()) << ref.status();
  const ModelConfig& c = t.checkpoint.config;
  const std::vector<int32_t> prompt = RandomPrompt(10, c.vocab_size, 5),
                             tokens = RandomPrompt(10, c.vocab_size, 9);
  auto kv = dec.AllocateKv(1, 64, budget);
  ASSERT_TRUE(kv.ok()) << kv.status();
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
  std::vector<SparseStepSeq> seqs = {{1, budget}};
  std::vector<ForwardSeq> fwd = {{prompt, 0, kv->get()}};
  ASSERT_TRUE(dec.Forward(fwd, seqs, &logits).ok());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t past = static_cast<int32_t>(prompt.size() + i);
    fwd = {{std::span<const int32_t>(&tokens[i], 1), past, kv->get()}};
    const int64_t before = last.step;
    ASSERT_TRUE(dec.Forward(fwd, seqs, &logits).ok());
    ASSERT_EQ(last.step, before + 1);
    ASSERT_EQ(last.positions, std::vector<int32_t>{past});
    EXPECT_FALSE(last.dense);
    const ReferenceStep r = ref->Step(tokens[i], past, **kv, sets(**kv, past));
    EXPECT_LT(r.k_row_error, 1e-4);
    double max_logit_err = 0, max_recall_err = 0, min_recall = 1;
    for (int64_t v = 0; v < c.vocab_size; ++v) {
      max_logit_err = std::max(max_logit_err, std::abs(logits.as<float>()[v] - r.logits[v]) /
                                                  (1 + std::abs(r.logits[v])));
    }
    for (int l = 0; l < last.n_layers; ++l) {
      for (int h = 0; h < last.n_heads; ++h) {
        max_recall_err =
            std::max(max_recall_err, std::abs(last.at(0, l, h) - r.recall[l * last.n_heads + h]));
        min_recall = std::min<double>(min_recall, last.at(0, l, h));
      }
    }
    EXPECT_LT(max_logit_err, 1e-4) << "step " << i;
    EXPECT_LT(max_recall_err, 1e-5) << "step " << i;
    EXPECT_LT(min_recall, 0.999) << "step "
                                 << i;  // budget 4 of >= 10 past tokens: something is missed
  }
}

class SourcesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = LoadTiny();
    ASSERT_TRUE(t.ok()) << t.status();
    tiny_ = *std::move(t);
  }
  std::unique_ptr<SparseDecoder> Decoder(SelectionSource source, int32_t budget,
                                         double fallback = 0) {
    SparseOptions o;
    o.budget = budget;
    o.sink = 1;
    o.source = source;
    o.fallback_mass = fallback;
    o.recall_observer = [this](const AttentionRecallStep& s) { last_ = s; };
    last_ = {};
    auto d = SparseDecoder::Create(
        tiny_->model.get(), source == SelectionSource::kHead ? tiny_->head.get() : nullptr, o);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? *std::move(d) : nullptr;
  }
  std::unique_ptr<Tiny> tiny_;
  AttentionRecallStep last_;
};

TEST_F(SourcesTest, SharedSetsRecallAndLogitsMatchTheReferenceDecode) {
  for (SelectionSource source : {SelectionSource::kHead, SelectionSource::kWindow}) {
    SCOPED_TRACE(SelectionSourceName(source));
    auto dec = Decoder(source, 4);
    ASSERT_NE(dec, nullptr);
    SparseDecoder* d = dec.get();
    CheckAgainstReference(*tiny_, *dec, last_, 4, [d](const SequenceKv&, int32_t) -> ReferenceSets {
      return [d](int, int g, const std::vector<double>&, const Tensor&) {
        auto p = d->last_sets().Positions(0, g);
        return std::vector<int32_t>(p.begin(), p.end());
      };
    });
  }
}

TEST_F(SourcesTest, PerLayerSetsRecallAndLogitsMatchTheReferenceDecode) {
  const int64_t n_heads = tiny_->checkpoint.config.num_attention_heads;
  for (SelectionSource source : {SelectionSource::kOracle, SelectionSource::kQuest}) {
    SCOPED_TRACE(SelectionSourceName(source));
    auto dec = Decoder(source, 4);
    ASSERT_NE(dec, nullptr);
    CheckAgainstReference(
        *tiny_, *dec, last_, 4, [&](const SequenceKv&, int32_t past) -> ReferenceSets {
          return [&, past](int, int g, const std::vector<double>& qd, const Tensor& k) {
            std::vector<float> q(qd.begin(), qd.end());
            if (source == SelectionSource::kOracle)
              return BruteOracle(q.data(), n_heads, k, g, past, 4, 1);
            SelectionQuery sq{Tensor(q.data(), DType::kF32, {n_heads, k.dim(2)}), k, past, 4};
            SelectionOptions so;
            so.budget = 4;
            IndexSets s;
            EXPECT_TRUE(
                QuestSelectTopB({&sq, 1}, so, kQuestPageSize, /*with_current=*/true, &s).ok());
            auto p = s.Positions(0, g);
            return std::vector<int32_t>(p.begin(), p.end());
          };
        });
  }
}

TEST_F(SourcesTest, RecallIsOneWhenTheBudgetCoversThePast) {
  const std::vector<int32_t> prompt = RandomPrompt(10, tiny_->checkpoint.config.vocab_size, 5);
  for (bool offload : {false, true}) {
    auto dec = Decoder(SelectionSource::kHead, 64);
    // Offloaded layers take the sparse path even within the budget: the sets then hold every past
    // token.
    if (offload) ASSERT_TRUE(dec->OffloadLayers(1).ok());
    EngineOptions eo;
    eo.sparse = std::shared_ptr<SparseDecoder>(std::move(dec));
    Engine engine(tiny_->model.get(), nullptr, eo);
    GenerationRequest r;
    r.prompt = prompt;
    r.max_new_tokens = 6;
    r.ignore_eos = true;
    ASSERT_TRUE(engine.Generate(r).ok());
    EXPECT_EQ(last_.dense, !offload);
    EXPECT_EQ(last_.n_layers, 3);
    for (float v : last_.recall) EXPECT_NEAR(v, 1.0f, 1e-5);
  }
}

TEST_F(SourcesTest, WindowSetsThroughTheEngineOffloadedOrNot) {
  const std::vector<int32_t> prompt = RandomPrompt(10, tiny_->checkpoint.config.vocab_size, 5);
  std::vector<int32_t> tokens[2];
  for (int offload = 0; offload < 2; ++offload) {
    SparseOptions o;
    o.budget = 6;
    o.sink = 2;
    o.source = SelectionSource::kWindow;
    auto d = SparseDecoder::Create(tiny_->model.get(), nullptr, o);
    ASSERT_TRUE(d.ok()) << d.status();
    std::shared_ptr<SparseDecoder> dec(std::move(*d));
    if (offload) ASSERT_TRUE(dec->OffloadLayers(1).ok());
    EngineOptions eo;
    eo.sparse = dec;
    Engine engine(tiny_->model.get(), nullptr, eo);
    tokens[offload] = Greedy(engine, prompt, 12);
    // 12 tokens: the prompt's forward gave the first, 11 decode steps the rest; the last one
    // decoded position 20 with 20 past tokens: {0, 1} and the 4 most recent.
    IndexSets want;
    WindowIndexSets(std::vector<int32_t>{20}, std::vector<int32_t>{6}, 2, 2, 2, &want);
    EXPECT_EQ(dec->last_sets().indices, want.indices);
    EXPECT_EQ(dec->last_sets().indices,
              (std::vector<int32_t>{0, 1, 16, 17, 18, 19, 0, 1, 16, 17, 18, 19}));
    EXPECT_GT(engine.sparse_stats().sparse_steps, 0);
  }
  EXPECT_EQ(tokens[0], tokens[1]);
}

TEST_F(SourcesTest, PerLayerSourcesNeedResidentLayers) {
  auto dec = Decoder(SelectionSource::kOracle, 4);
  ASSERT_TRUE(dec->OffloadLayers(2).ok());
  EngineOptions eo;
  eo.sparse = std::shared_ptr<SparseDecoder>(std::move(dec));
  Engine engine(tiny_->model.get(), nullptr, eo);
  GenerationRequest r;
  r.prompt = RandomPrompt(10, tiny_->checkpoint.config.vocab_size, 5);
  r.max_new_tokens = 3;
  auto res = engine.Generate(r);
  ASSERT_FALSE(res.ok());
  EXPECT_EQ(res.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(res.status().message().find("resident"), std::string::npos) << res.status();
}

TEST_F(SourcesTest, WeakRetrievalFallbackTriggersAndIsCounted) {
  const std::vector<int32_t> prompt = RandomPrompt(10, tiny_->checkpoint.config.vocab_size, 5);
  Engine dense_engine(tiny_->model.get(), nullptr, EngineOptions{});
  const std::vector<int32_t> dense = Greedy(dense_engine, prompt, 12);
  // Threshold 1: every step whose head kept less than all of its mass (budget 4 < past) falls back;
  // with every layer resident that is dense attention, so the tokens are the dense ones.
  for (double threshold : {1.0, 1e-9}) {
    auto dec = Decoder(SelectionSource::kHead, 4, threshold);
    EngineOptions eo;
    eo.sparse = std::shared_ptr<SparseDecoder>(std::move(dec));
    Engine engine(tiny_->model.get(), nullptr, eo);
    const std::vector<int32_t> got = Greedy(engine, prompt, 12);
    const SparseEngineStats st = engine.sparse_stats();
    ASSERT_GT(st.sparse_steps, 0);
    if (threshold == 1.0) {
      EXPECT_EQ(st.weak_retrieval_fallback_steps, st.sparse_steps);
      EXPECT_EQ(got, dense);
      EXPECT_TRUE(last_.fallback);
      for (float v : last_.recall) EXPECT_EQ(v, 1.0f);  // what the resident layers read: everything
    } else {
      EXPECT_EQ(st.weak_retrieval_fallback_steps, 0);
      EXPECT_FALSE(last_.fallback);
    }
    ASSERT_EQ(last_.head_mass.size(), 1u);
    EXPECT_LT(last_.head_mass[0], 1.0f);
  }
}

TEST_F(SourcesTest, CreateRefusesBadCombinations) {
  SparseOptions o;
  o.budget = 4;
  EXPECT_EQ(SparseDecoder::Create(tiny_->model.get(), nullptr, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.source = SelectionSource::kWindow;
  EXPECT_TRUE(SparseDecoder::Create(tiny_->model.get(), nullptr, o).ok());
  o.fallback_mass = 0.5;
  EXPECT_EQ(SparseDecoder::Create(tiny_->model.get(), nullptr, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.source = SelectionSource::kHead;
  o.fallback_mass = 1.5;
  EXPECT_EQ(SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace specontext
