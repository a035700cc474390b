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
//     tokens;
//   - the fallback is per sequence: in a batch only the weak sequence attends to every past position in
//     the resident layers (its logits the dense run's, or the reference's with an offloaded layer reading
//     the head's set), the others' logits are those of the batch without the fallback, and both counters
//     (steps with a weak sequence, weak sequence-steps) count exactly; a threshold of 1 makes every
//     sequence of a batch dense.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

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
      EXPECT_EQ(st.weak_retrieval_fallback_sequences, st.sparse_steps);  // one sequence per step
      EXPECT_EQ(got, dense);
      EXPECT_EQ(last_.fallback, std::vector<uint8_t>{1});
      for (float v : last_.recall) EXPECT_EQ(v, 1.0f);  // what the resident layers read: everything
    } else {
      EXPECT_EQ(st.weak_retrieval_fallback_steps, 0);
      EXPECT_EQ(st.weak_retrieval_fallback_sequences, 0);
      EXPECT_EQ(last_.fallback, std::vector<uint8_t>{0});
    }
    ASSERT_EQ(last_.head_mass.size(), 1u);
    EXPECT_LT(last_.head_mass[0], 1.0f);
  }
}

// A teacher-forced batch decode through `dec` (driven directly): the prompts' forward, then `steps` decode
// steps of the tokens RandomPrompt(steps, vocab, 100 + i) for sequence i. Per decode step: the logits
// [n_seqs][vocab], the probe's record and, per sequence, the reference's logits where `ref_sets` is given
// (it names the positions sequence `seq` read in layer `layer`, KV head g at that step).
struct BatchRun {
  std::vector<std::vector<std::vector<float>>> logits;  // [step][seq][vocab]
  std::vector<AttentionRecallStep> probes;              // [step]
  std::vector<std::vector<double>> ref_error;           // [step][seq] max relative logit error (or -1)
  SparseEngineStats stats;
};

using BatchRefSets = std::function<std::vector<int32_t>(int seq, int layer, int g, int32_t past)>;

BatchRun RunBatch(Tiny& t, SparseDecoder& dec, const AttentionRecallStep& last,
                  const std::vector<int32_t>& budgets, int steps, const BatchRefSets& ref_sets = {}) {
  BatchRun out;
  const ModelConfig& c = t.checkpoint.config;
  const int n = static_cast<int>(budgets.size());
  auto ref = ReferenceDecoder::Create(t.checkpoint);
  EXPECT_TRUE(ref.ok()) << ref.status();
  std::vector<std::vector<int32_t>> prompts(n), tokens(n);
  std::vector<std::unique_ptr<SequenceKv>> kvs(n);
  std::vector<SparseStepSeq> seqs;
  std::vector<ForwardSeq> fwd;
  for (int i = 0; i < n; ++i) {
    prompts[i] = RandomPrompt(12, c.vocab_size, 50 + i);
    tokens[i] = RandomPrompt(steps, c.vocab_size, 100 + i);
    auto kv = dec.AllocateKv(i + 1, 64, budgets[i]);
    EXPECT_TRUE(kv.ok()) << kv.status();
    if (!kv.ok()) {
      return out;
    }
    kvs[i] = *std::move(kv);
    seqs.push_back({static_cast<uint64_t>(i + 1), budgets[i]});
    fwd.push_back({prompts[i], 0, kvs[i].get()});
  }
  Tensor logits = Tensor::HostEmpty(DType::kF32, {n, c.vocab_size});
  absl::Status st = dec.Forward(fwd, seqs, &logits);
  EXPECT_TRUE(st.ok()) << st;
  for (int s = 0; s < steps && st.ok(); ++s) {
    for (int i = 0; i < n; ++i) {
      fwd[i] = {std::span<const int32_t>(&tokens[i][s], 1), static_cast<int32_t>(prompts[i].size()) + s,
                kvs[i].get()};
    }
    st = dec.Forward(fwd, seqs, &logits);
    EXPECT_TRUE(st.ok()) << st;
    out.probes.push_back(last);
    out.logits.emplace_back();
    out.ref_error.emplace_back(n, -1.0);
    for (int i = 0; i < n; ++i) {
      const float* row = logits.as<float>() + static_cast<int64_t>(i) * c.vocab_size;
      out.logits.back().emplace_back(row, row + c.vocab_size);
      if (!ref_sets || !ref.ok()) {
        continue;
      }
      const int32_t past = fwd[i].past_len;
      const ReferenceStep r = ref->Step(tokens[i][s], past, *kvs[i], [&](int l, int g, const std::vector<double>&,
                                                                          const Tensor&) {
        return ref_sets(i, l, g, past);
      });
      double err = 0;
      for (int64_t v = 0; v < c.vocab_size; ++v) {
        err = std::max(err, std::abs(row[v] - r.logits[v]) / (1 + std::abs(r.logits[v])));
      }
      out.ref_error.back()[i] = err;
    }
  }
  out.stats = dec.stats();
  for (int i = 0; i < n; ++i) dec.Release(i + 1);
  return out;
}

// The dense engine path (Transformer::Forward, no sparse hooks) on sequence `i` of RunBatch alone: its
// logits per decode step.
std::vector<std::vector<float>> DenseAlone(Tiny& t, int i, int steps) {
  const ModelConfig& c = t.checkpoint.config;
  const std::vector<int32_t> prompt = RandomPrompt(12, c.vocab_size, 50 + i),
                             tokens = RandomPrompt(steps, c.vocab_size, 100 + i);
  auto kv = t.model->AllocateKv(64);
  EXPECT_TRUE(kv.ok()) << kv.status();
  if (!kv.ok()) {
    return {};
  }
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
  std::vector<ForwardSeq> fwd = {{prompt, 0, kv->get()}};
  EXPECT_TRUE(t.model->Forward(fwd, false, &logits).ok());
  std::vector<std::vector<float>> out;
  for (int s = 0; s < steps; ++s) {
    fwd = {{std::span<const int32_t>(&tokens[s], 1), static_cast<int32_t>(prompt.size()) + s, kv->get()}};
    EXPECT_TRUE(t.model->Forward(fwd, false, &logits).ok());
    out.emplace_back(logits.as<float>(), logits.as<float>() + c.vocab_size);
  }
  return out;
}

double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double err = a.size() == b.size() ? 0 : INFINITY;
  for (size_t v = 0; v < a.size() && v < b.size(); ++v) {
    err = std::max(err, std::abs(double(a[v]) - b[v]) / (1 + std::abs(double(b[v]))));
  }
  return err;
}

// The fallback is decided per sequence: in a batch of three where the threshold makes only sequence 0 weak
// (budget 2 against 10 for the others), sequence 0 attends to every past position in the resident layers
// (and the head's set in an offloaded one), the others' logits are those of the same batch without the
// fallback, and the counters say one weak sequence per step.
TEST_F(SourcesTest, WeakRetrievalFallbackIsPerSequence) {
  constexpr int kSteps = 8;
  const std::vector<int32_t> budgets = {2, 10, 10};
  const std::vector<std::vector<float>> dense0 = DenseAlone(*tiny_, 0, kSteps);
  for (int offload = 0; offload < 2; ++offload) {
    SCOPED_TRACE(offload ? "layer 2 offloaded" : "every layer resident");
    auto off = Decoder(SelectionSource::kHead, 10);
    ASSERT_NE(off, nullptr);
    if (offload) {
      ASSERT_TRUE(off->OffloadLayers(2).ok());
    }
    const BatchRun a = RunBatch(*tiny_, *off, last_, budgets, kSteps);
    ASSERT_EQ(a.probes.size(), static_cast<size_t>(kSteps));
    // A threshold between sequence 0's largest captured mass and the others' smallest.
    float weak_hi = 0, strong_lo = 1;
    for (const AttentionRecallStep& p : a.probes) {
      ASSERT_EQ(p.head_mass.size(), 3u);
      weak_hi = std::max(weak_hi, p.head_mass[0]);
      strong_lo = std::min({strong_lo, p.head_mass[1], p.head_mass[2]});
    }
    ASSERT_LT(weak_hi, strong_lo) << "the budgets do not separate the sequences' captured mass";
    EXPECT_EQ(a.stats.weak_retrieval_fallback_steps, 0);
    EXPECT_EQ(a.stats.weak_retrieval_fallback_sequences, 0);

    auto on = Decoder(SelectionSource::kHead, 10, (weak_hi + strong_lo) / 2);
    ASSERT_NE(on, nullptr);
    if (offload) {
      ASSERT_TRUE(on->OffloadLayers(2).ok());
    }
    SparseDecoder* d = on.get();
    const int resident = offload ? 2 : 3;
    const BatchRun b = RunBatch(*tiny_, *on, last_, budgets, kSteps, [&](int seq, int layer, int g, int32_t past) {
      std::vector<int32_t> all(past);
      std::iota(all.begin(), all.end(), 0);
      if (seq == 0 && layer < resident) return all;
      auto p = d->last_sets().Positions(seq, g);
      return std::vector<int32_t>(p.begin(), p.end());
    });
    ASSERT_EQ(b.probes.size(), static_cast<size_t>(kSteps));
    for (int s = 0; s < kSteps; ++s) {
      SCOPED_TRACE(absl::StrCat("step ", s));
      EXPECT_EQ(b.probes[s].fallback, (std::vector<uint8_t>{1, 0, 0}));
      EXPECT_LT(b.ref_error[s][0], 1e-4);  // every past position in the resident layers
      if (!offload) {
        EXPECT_LT(MaxRelDiff(b.logits[s][0], dense0[s]), 1e-4);  // = the dense run of it alone
      }
      for (int i = 1; i < 3; ++i) {
        EXPECT_EQ(b.logits[s][i], a.logits[s][i]) << "sequence " << i << " changed by another's fallback";
        EXPECT_LT(b.ref_error[s][i], 1e-4);
      }
      // Recall 1 where sequence 0 read everything; its offloaded layer read the head's set (budget 2).
      for (int l = 0; l < b.probes[s].n_layers; ++l) {
        for (int h = 0; h < b.probes[s].n_heads && l < resident; ++h) {
          EXPECT_EQ(b.probes[s].at(0, l, h), 1.0f);
        }
      }
    }
    // Sequence 0 differs from its sparse decode without the fallback (budget 2 of >= 12 past tokens).
    EXPECT_GT(MaxRelDiff(b.logits[0][0], a.logits[0][0]), 1e-4);
    EXPECT_EQ(b.stats.weak_retrieval_fallback_steps, kSteps);
    EXPECT_EQ(b.stats.weak_retrieval_fallback_sequences, kSteps);
  }
}

// Threshold 1: every sequence of a batch is weak at every step (a budget below the past keeps less than all
// of the mass), so with every layer resident each sequence's logits are its dense ones.
TEST_F(SourcesTest, WeakRetrievalFallbackOfOneGivesEverySequenceDenseResults) {
  constexpr int kSteps = 6;
  const std::vector<int32_t> budgets = {4, 3, 6};
  auto dec = Decoder(SelectionSource::kHead, 4, 1.0);
  ASSERT_NE(dec, nullptr);
  const BatchRun b = RunBatch(*tiny_, *dec, last_, budgets, kSteps);
  ASSERT_EQ(b.probes.size(), static_cast<size_t>(kSteps));
  for (int i = 0; i < 3; ++i) {
    const std::vector<std::vector<float>> dense = DenseAlone(*tiny_, i, kSteps);
    ASSERT_EQ(dense.size(), static_cast<size_t>(kSteps));
    for (int s = 0; s < kSteps; ++s) {
      EXPECT_LT(MaxRelDiff(b.logits[s][i], dense[s]), 1e-4) << "sequence " << i << " step " << s;
    }
  }
  for (const AttentionRecallStep& p : b.probes) {
    EXPECT_EQ(p.fallback, (std::vector<uint8_t>{1, 1, 1}));
    for (float v : p.recall) EXPECT_EQ(v, 1.0f);
  }
  EXPECT_EQ(b.stats.weak_retrieval_fallback_steps, kSteps);
  EXPECT_EQ(b.stats.weak_retrieval_fallback_sequences, 3 * kSteps);
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
