// The sparse decode path end to end on the CPU backend: a tiny random checkpoint, a `layer`
// retrieval head pruned from it, the Engine in sparse mode against the Engine in dense mode.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "core/model/engine.h"
#include "core/model/kv_tiers.h"
#include "core/sparse/elastic.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext {
namespace {

using testing::Greedy;
using testing::LoadTiny;
using testing::RandomPrompt;
using testing::Tiny;

std::shared_ptr<SparseDecoder> MakeDecoder(Tiny& t, int32_t budget, int64_t limit = 0,
                                           int32_t sink = 1,
                                           SelectionMode mode = SelectionMode::kHeadLevel,
                                           int32_t grow_rows = SparseOptions{}.kv_grow_rows) {
  SparseOptions o;
  o.kv_grow_rows = grow_rows;
  o.mode = mode;
  o.budget = budget;
  o.sink = sink;
  o.gpu_memory_limit = limit;
  auto d = SparseDecoder::Create(t.model.get(), t.head.get(), o);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? std::shared_ptr<SparseDecoder>(std::move(*d)) : nullptr;
}

// A greedy request of n tokens submitted to `engine`; its tokens and end arrive in *tokens / *done
// as the caller steps the engine.
absl::StatusOr<uint64_t> SubmitGreedy(Engine& engine, const std::vector<int32_t>& prompt, int n,
                                      std::vector<int32_t>* tokens, bool* done) {
  GenerationRequest r;
  r.prompt = prompt;
  r.max_new_tokens = n;
  r.ignore_eos = true;
  return engine.Submit(r, [tokens, done](const StreamEvent& ev) {
    if (ev.token >= 0) tokens->push_back(ev.token);
    *done = *done || ev.done;
  });
}

// A device limit (measured planner model) under which every layer fits for ~30 rows of one sequence
// only, for a decoder made while *probe (kept alive: its head copy is then part of what that
// decoder measures) lives. The next decoder uploads its own copy of the head's weights (kRetrieval)
// before it measures.
int64_t LimitForAbout30Rows(Tiny& t, int32_t budget, std::shared_ptr<SparseDecoder>* probe) {
  *probe = MakeDecoder(t, budget, int64_t{1} << 40);
  const MemoryPlanner& p = *(*probe)->planner();
  return static_cast<int64_t>(p.fixed_bytes() + (*probe)->device_head().weight_bytes() +
                              30 * p.PerTokenBytes(0));
}

class SparseEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = LoadTiny();
    ASSERT_TRUE(t.ok()) << t.status();
    tiny_ = *std::move(t);
    prompt_ = RandomPrompt(10, tiny_->checkpoint.config.vocab_size, 5);
    Engine dense(tiny_->model.get(), nullptr, EngineOptions{});
    dense_ = Greedy(dense, prompt_, 40);
    ASSERT_EQ(dense_.size(), 40u);
  }
  // The greedy tokens of prompt_ (40) with budget B, every layer resident: what limited runs must match.
  std::vector<int32_t> SparseReference(int32_t budget) {
    EngineOptions eo;
    eo.sparse = MakeDecoder(*tiny_, budget);
    Engine ref(tiny_->model.get(), nullptr, eo);
    return Greedy(ref, prompt_, 40);
  }
  std::unique_ptr<Tiny> tiny_;
  std::vector<int32_t> prompt_, dense_;
};

TEST_F(SparseEngineTest, BudgetAtLeastTheLengthGivesTheDenseTokens) {
  EngineOptions eo;
  eo.sparse = MakeDecoder(*tiny_, 64);
  Engine sparse(tiny_->model.get(), nullptr, eo);
  EXPECT_EQ(Greedy(sparse, prompt_, 40), dense_);
  EXPECT_GT(sparse.sparse_stats().dense_steps, 0);
  EXPECT_EQ(sparse.sparse_stats().sparse_steps, 0);

  // The same with layers 1 and 2 offloaded from the start: sparse attention over slot buffers that
  // hold every past token is exact dense attention.
  auto dec = MakeDecoder(*tiny_, 64);
  ASSERT_TRUE(dec->OffloadLayers(1).ok());
  eo.sparse = dec;
  Engine offloaded(tiny_->model.get(), nullptr, eo);
  EXPECT_EQ(Greedy(offloaded, prompt_, 40), dense_);
  const SparseEngineStats st = offloaded.sparse_stats();
  EXPECT_GT(st.sparse_steps, 0);
  EXPECT_EQ(st.offloaded_layers, 2);
  EXPECT_GT(st.elastic.rows_loaded, 0);
  EXPECT_GT(st.elastic.overlap_ratio(), 0.5);  // sets only grow by one token per step
}

TEST_F(SparseEngineTest, SmallBudgetSelectsWithinBudgetAndLayerMovesDoNotChangeOutputs) {
  constexpr int32_t kB = 6;
  EngineOptions eo;
  eo.sparse = MakeDecoder(*tiny_, kB);
  Engine ref(tiny_->model.get(), nullptr, eo);
  const std::vector<int32_t> want = Greedy(ref, prompt_, 40);
  ASSERT_EQ(want.size(), 40u);
  EXPECT_GT(ref.sparse_stats().sparse_steps, 0);
  EXPECT_LT(ref.sparse_stats().last_captured_mass, 1.0)
      << "a budget of 6 out of ~50 tokens drops some mass";

  auto dec = MakeDecoder(*tiny_, kB);
  eo.sparse = dec;
  Engine moved(tiny_->model.get(), nullptr, eo);
  std::vector<int32_t> got;
  bool done = false;
  ASSERT_TRUE(SubmitGreedy(moved, prompt_, 40, &got, &done).ok());
  const size_t kv_index = static_cast<size_t>(MemoryKind::kKvCache);
  int64_t steps = 0;
  while (!done) {
    ASSERT_TRUE(moved.Step().ok());
    ++steps;
    const IndexSets& sets = dec->last_sets();
    if (sets.n_seqs == 1) {
      for (int32_t g = 0; g < sets.n_kv_heads; ++g) {
        auto pos = sets.Positions(0, g);
        EXPECT_EQ(static_cast<int32_t>(pos.size()), std::min(kB, sets.seq_len[0]));
        if (!pos.empty()) EXPECT_EQ(pos[0], 0) << "the sink token is always selected";
      }
    }
    if (steps == 6 || steps == 14) {
      const int64_t device_kv = tiny_->backend->memory_report().bytes[kv_index];
      ASSERT_TRUE(dec->OffloadLayers(steps == 6 ? 2 : 0).ok());
      EXPECT_LT(tiny_->backend->memory_report().bytes[kv_index], device_kv) << "device KV is freed";
      EXPECT_GT(tiny_->backend->host_memory_report().total, 0);
    }
  }
  EXPECT_EQ(got, want);
  EXPECT_EQ(moved.sparse_stats().offloaded_layers, 3);
  EXPECT_EQ(moved.sparse_stats().layer_moves, 3);
}

TEST_F(SparseEngineTest, BatchLevelSelectionSharesOneSetAndSurvivesLayerMoves) {
  EngineOptions eo;
  auto ref_dec = MakeDecoder(*tiny_, 5, 0, 2, SelectionMode::kBatchLevel);
  eo.sparse = ref_dec;
  Engine ref(tiny_->model.get(), nullptr, eo);
  const std::vector<int32_t> want = Greedy(ref, prompt_, 30);
  EXPECT_EQ(ref_dec->last_sets().sets_per_seq, 1);
  EXPECT_EQ(ref_dec->last_sets().Positions(0, 0).size(), 5u);
  auto dec = MakeDecoder(*tiny_, 5, 0, 2, SelectionMode::kBatchLevel);
  ASSERT_TRUE(dec->OffloadLayers(0).ok());
  eo.sparse = dec;
  Engine moved(tiny_->model.get(), nullptr, eo);
  EXPECT_EQ(Greedy(moved, prompt_, 30), want);
  EXPECT_GT(dec->stats().elastic.rows_loaded, 0);
}

TEST_F(SparseEngineTest, PlannerMovesLayersUnderADeviceLimitWithoutChangingOutputs) {
  constexpr int32_t kB = 6;
  EngineOptions eo;
  const std::vector<int32_t> want = SparseReference(kB);

  // A limit where everything fits at 20 tokens but not at 50: measure the planner's model, then set
  // it.
  std::shared_ptr<SparseDecoder> probe;
  const int64_t limit = LimitForAbout30Rows(*tiny_, kB, &probe);
  auto dec = MakeDecoder(*tiny_, kB, limit);
  auto st0 = dec->planner()->Thresholds(1);
  ASSERT_TRUE(st0.ok());
  ASSERT_GT((*st0)[0], 20);
  ASSERT_LT((*st0)[0], 50);
  eo.sparse = dec;
  Engine limited(tiny_->model.get(), nullptr, eo);
  EXPECT_EQ(Greedy(limited, prompt_, 40), want);
  EXPECT_GT(limited.sparse_stats().offloaded_layers, 0);
  EXPECT_GT(limited.sparse_stats().layer_moves, 0);
}

TEST_F(SparseEngineTest, SyntheticOverlapControlsTheElasticOverlap) {
  SparseOptions o;
  o.budget = 16;
  o.synthetic_overlap = 0.8;
  auto d = SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), o);
  ASSERT_TRUE(d.ok()) << d.status();
  std::shared_ptr<SparseDecoder> dec(std::move(*d));
  ASSERT_TRUE(dec->OffloadLayers(1).ok());
  EngineOptions eo;
  eo.sparse = dec;
  Engine e(tiny_->model.get(), nullptr, eo);
  Greedy(e, RandomPrompt(40, tiny_->checkpoint.config.vocab_size, 9), 60);
  const SparseEngineStats st = e.sparse_stats();
  EXPECT_GT(st.sparse_steps, 50);
  EXPECT_TRUE(ValidateIndexSets(dec->last_sets()).ok());
  // round(0.8 · 16) = 13 of 16 positions kept from the previous step (the first sparse step loads
  // all).
  EXPECT_NEAR(st.elastic.overlap_ratio(), 13.0 / 16, 0.03);
  // Out of range is refused.
  o.synthetic_overlap = 1.5;
  EXPECT_EQ(SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SparseEngineTest, ElasticSlotBuffersEqualAFullReload) {
  auto dec = MakeDecoder(*tiny_, 5);
  ASSERT_TRUE(dec->OffloadLayers(1).ok());
  const ModelConfig& c = tiny_->checkpoint.config;
  auto kv = dec->AllocateKv(1, 64, 5);
  ASSERT_TRUE(kv.ok()) << kv.status();
  std::vector<int32_t> tokens = prompt_;
  int32_t cached = 0;
  for (int step = 0; step < 25; ++step) {
    ForwardSeq f{std::span<const int32_t>(tokens.data() + cached, tokens.size() - cached), cached,
                 kv->get()};
    Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
    ASSERT_TRUE(dec->Forward({&f, 1}, std::vector<SparseStepSeq>{{1, 5}}, &logits).ok());
    cached = static_cast<int32_t>(tokens.size());
    const float* lg = logits.as<float>();
    tokens.push_back(static_cast<int32_t>(std::max_element(lg, lg + c.vocab_size) - lg));
    if (step == 0) continue;
    // Every position of the step's sets sits in its mapped slot of every offloaded layer, exactly
    // as a full reload (FullReloadCopies into fresh buffers) would have put it.
    const IndexSets& sets = dec->last_sets();
    const SlotMap* map = dec->slot_map(1);
    ASSERT_NE(map, nullptr);
    std::vector<int32_t> slots;
    for (int32_t s = 0; s < sets.n_sets(); ++s) {
      for (int32_t p : sets.SetPositions(s)) slots.push_back(map->SlotOf(s, p));
    }
    const CopyList full = FullReloadCopies(sets, slots);
    for (int l = 1; l < c.num_hidden_layers; ++l) {
      SequenceKv& k = **kv;
      Tensor fk = Tensor::HostEmpty(DType::kF32, k.slot_k[l].shape()),
             fv = Tensor::HostEmpty(DType::kF32, k.slot_v[l].shape());
      std::vector<LayerRows> rows = {{k.host_k[l], k.host_v[l], fk, fv}};
      ASSERT_TRUE(ExecuteCopiesCpu(full, rows, nullptr).ok());
      const int64_t hd = c.head_dim, b = k.slot_budget;
      for (int32_t g = 0; g < sets.n_kv_heads; ++g) {
        for (int32_t p : sets.Positions(0, g)) {
          const int32_t slot = map->SlotOf(sets.SetIndex(0, g), p);
          ASSERT_GE(slot, 0);
          const int64_t off = (g * b + slot) * hd;
          EXPECT_EQ(std::memcmp(k.slot_k[l].as<float>() + off, fk.as<float>() + off, hd * 4), 0);
          EXPECT_EQ(std::memcmp(k.slot_v[l].as<float>() + off, fv.as<float>() + off, hd * 4), 0);
        }
      }
    }
  }
  EXPECT_GT(dec->stats().elastic.bytes_full_reload, dec->stats().elastic.bytes_loaded)
      << "elastic loading moves less than full reloads once sets overlap";
}

TEST_F(SparseEngineTest, BadInputIsRefusedClearly) {
  SparseOptions o;
  o.budget = 0;
  auto d = SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), o);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("budget"), std::string::npos) << d.status();
  o.budget = static_cast<int32_t>(tiny_->checkpoint.config.max_position_embeddings) + 1;
  d = SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), o);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("context"), std::string::npos) << d.status();

  // A per-request budget larger than the context.
  EngineOptions eo;
  eo.sparse = MakeDecoder(*tiny_, 8);
  Engine engine(tiny_->model.get(), nullptr, eo);
  GenerationRequest r;
  r.prompt = prompt_;
  r.budget = static_cast<int32_t>(tiny_->checkpoint.config.max_position_embeddings) + 5;
  auto id = engine.Submit(r, {});
  ASSERT_FALSE(id.ok());
  EXPECT_NE(id.status().message().find("budget"), std::string::npos);

  // A head made for a model with other KV heads does not load for this one.
  ModelConfig other = tiny_->checkpoint.config;
  other.num_key_value_heads = 4;
  auto files = testing::TinyFiles(7);
  ASSERT_TRUE(files.ok());
  auto bad = RetrievalHead::Load(files->second, other, nullptr);
  ASSERT_FALSE(bad.ok());

  // Corrupt head files.
  const std::string dir = testing::TestDir("corrupt_head");
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(files->second + "/model.safetensors", dir + "/model.safetensors",
                             std::filesystem::copy_options::overwrite_existing);
  std::ofstream(dir + "/config.json") << "{\"architectures\": [";
  auto corrupt =
      RetrievalHead::Load(dir, tiny_->checkpoint.config, tiny_->checkpoint.weights.get());
  ASSERT_FALSE(corrupt.ok());
  EXPECT_NE(corrupt.status().message().find(dir), std::string::npos) << corrupt.status();
  std::filesystem::copy_file(files->second + "/config.json", dir + "/config.json",
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::resize_file(dir + "/model.safetensors", 100);
  corrupt = RetrievalHead::Load(dir, tiny_->checkpoint.config, tiny_->checkpoint.weights.get());
  EXPECT_FALSE(corrupt.ok());
}

TEST_F(SparseEngineTest, BatchOfRequestsWithOwnBudgetsAndADenseOne) {
  EngineOptions eo;
  auto dec = MakeDecoder(*tiny_, 6);
  ASSERT_TRUE(dec->OffloadLayers(2).ok());
  eo.sparse = dec;
  Engine engine(tiny_->model.get(), nullptr, eo);
  // Request 0: dense inside sparse mode -> the dense engine's tokens. Requests 1, 2: their own
  // budgets, decoded in one batch, each equal to the same request run alone.
  std::vector<std::vector<int32_t>> got(3);
  std::vector<int32_t> budgets = {0, 4, 9};
  for (int i = 0; i < 3; ++i) {
    GenerationRequest r;
    r.prompt = i == 0 ? prompt_ : RandomPrompt(7 + i, tiny_->checkpoint.config.vocab_size, 20 + i);
    r.max_new_tokens = 40;
    r.ignore_eos = true;
    r.dense = i == 0;
    r.budget = budgets[i];
    ASSERT_TRUE(engine
                    .Submit(r,
                            [&got, i](const StreamEvent& ev) {
                              if (ev.token >= 0) got[i].push_back(ev.token);
                            })
                    .ok());
  }
  while (engine.HasWork()) ASSERT_TRUE(engine.Step().ok());
  EXPECT_EQ(got[0], dense_);
  for (int i = 1; i < 3; ++i) {
    auto alone_dec = MakeDecoder(*tiny_, 6);
    ASSERT_TRUE(alone_dec->OffloadLayers(2).ok());
    EngineOptions ao;
    ao.sparse = alone_dec;
    Engine alone(tiny_->model.get(), nullptr, ao);
    EXPECT_EQ(Greedy(alone, RandomPrompt(7 + i, tiny_->checkpoint.config.vocab_size, 20 + i), 40,
                     budgets[i]),
              got[i])
        << "request " << i;
  }
}

TEST_F(SparseEngineTest, DeviceKvGrowsInChunksWithoutChangingOutputs) {
  // Reference: every resident layer holds the whole capacity from admission.
  constexpr int32_t kB = 6, kGrow = 8;
  EngineOptions eo;
  eo.sparse = MakeDecoder(*tiny_, kB, 0, 1, SelectionMode::kHeadLevel, /*grow_rows=*/0);
  Engine ref(tiny_->model.get(), nullptr, eo);
  const std::vector<int32_t> want = Greedy(ref, prompt_, 40);
  ASSERT_EQ(want.size(), 40u);
  EXPECT_EQ(ref.sparse_stats().kv_grows, 0);

  // Growing in chunks of 8 rows (the 10-token prompt, then every 8 tokens), with a layer moved to
  // host midway: the same tokens, and the device holds only the rows the sequence reached.
  auto dec = MakeDecoder(*tiny_, kB, 0, 1, SelectionMode::kHeadLevel, kGrow);
  eo.sparse = dec;
  Engine grown(tiny_->model.get(), nullptr, eo);
  std::vector<int32_t> got;
  bool done = false;
  ASSERT_TRUE(SubmitGreedy(grown, prompt_, 40, &got, &done).ok());
  const ModelConfig& c = tiny_->checkpoint.config;
  const int64_t row_bytes = c.num_key_value_heads * c.head_dim *
                            static_cast<int64_t>(DTypeSize(tiny_->backend->compute_dtype()));
  const size_t kv_index = static_cast<size_t>(MemoryKind::kKvCache);
  int64_t steps = 0;
  while (!done) {
    ASSERT_TRUE(grown.Step().ok());
    ++steps;
    if (steps == 12) ASSERT_TRUE(dec->OffloadLayers(2).ok());
    if (done) break;
    // Tokens whose KV exists after this step: prompt + steps - 1 generated ones fed back.
    const int64_t len = static_cast<int64_t>(prompt_.size()) + steps - 1;
    const int64_t rows = (len + kGrow - 1) / kGrow * kGrow;
    const int32_t resident = dec->gpu_layers();
    const int64_t device_kv = tiny_->backend->memory_report().bytes[kv_index];
    EXPECT_EQ(device_kv, 2 * resident * rows * row_bytes)
        << "step " << steps << ": K and V of " << resident << " resident layers x " << rows
        << " rows";
    ASSERT_NE(dec->retrieval_cache(1), nullptr);
    EXPECT_EQ(dec->retrieval_cache(1)->dim(1), rows) << "the head's K cache grows with the KV";
  }
  EXPECT_EQ(got, want);
  EXPECT_GE(grown.sparse_stats().kv_grows, 5) << "10 -> 49 tokens in chunks of 8";
  EXPECT_EQ(grown.sparse_stats().offloaded_layers, 1);
}

TEST_F(SparseEngineTest, PlannerMovesLayersAsTheDeviceKvGrows) {
  constexpr int32_t kB = 6, kGrow = 8;
  EngineOptions eo;
  const std::vector<int32_t> want = SparseReference(kB);
  // A limit that holds every layer for 24 rows but not 48: with the KV growing in chunks of 8 the
  // sequence is admitted with every layer resident and the planner moves layers during generation.
  std::shared_ptr<SparseDecoder> probe;
  const int64_t limit = LimitForAbout30Rows(*tiny_, kB, &probe);
  auto dec = MakeDecoder(*tiny_, kB, limit, 1, SelectionMode::kHeadLevel, kGrow);
  eo.sparse = dec;
  Engine limited(tiny_->model.get(), nullptr, eo);
  std::vector<int32_t> got;
  bool done = false;
  ASSERT_TRUE(SubmitGreedy(limited, prompt_, 40, &got, &done).ok());
  const int32_t n_layers = static_cast<int32_t>(tiny_->checkpoint.config.num_hidden_layers);
  int32_t resident_after_first_step = -1;
  while (!done) {
    ASSERT_TRUE(limited.Step().ok());
    if (resident_after_first_step < 0) resident_after_first_step = dec->gpu_layers();
  }
  EXPECT_EQ(resident_after_first_step, n_layers) << "16 rows fit with every layer on the device";
  EXPECT_LT(dec->gpu_layers(), n_layers) << "48 rows do not";
  EXPECT_EQ(got, want);
  // A growth step below zero is refused.
  SparseOptions bad;
  bad.kv_grow_rows = -1;
  EXPECT_EQ(SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), bad).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// SparseOptions::max_context: the planner plans for sequences up to that length (its prefill staging
// reserve, on GPUs), sequences beyond it are refused at admission, and values outside [budget, the model's
// context] are refused at creation.
TEST_F(SparseEngineTest, MaxContextBoundsAdmissionAndThePlanner) {
  const int32_t model_ctx = static_cast<int32_t>(tiny_->checkpoint.config.max_position_embeddings);
  SparseOptions o;
  o.budget = 8;
  o.gpu_memory_limit = int64_t{1} << 40;
  o.max_context = 64;
  auto d = SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), o);
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_TRUE((*d)->planner().has_value());
  EXPECT_EQ((*d)->planner()->config().max_context, 64);
  EXPECT_TRUE((*d)->AllocateKv(1, 64, 8).ok());
  auto too_long = (*d)->AllocateKv(2, 65, 8);
  ASSERT_FALSE(too_long.ok());
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(too_long.status().message().find("max context 64"), std::string::npos) << too_long.status();
  (*d)->Release(1);

  o.max_context = 0;  // the model's
  d = SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), o);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)->planner()->config().max_context, model_ctx);
  for (int32_t bad : {-1, 7, model_ctx + 1}) {  // below 0, below the budget, above the model's context
    o.max_context = bad;
    auto r = SparseDecoder::Create(tiny_->model.get(), tiny_->head.get(), o);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("max context"), std::string::npos) << r.status();
  }
}

// ForwardDevice (the logits left on the backend) gives Forward's logits, also for a step that mixes
// a prompt chunk and a decode token (two passes merged into one buffer).
TEST_F(SparseEngineTest, ForwardDeviceGivesForwardsLogits) {
  auto a = MakeDecoder(*tiny_, 6), b = MakeDecoder(*tiny_, 6);
  ASSERT_TRUE(a->OffloadLayers(2).ok());
  ASSERT_TRUE(b->OffloadLayers(2).ok());
  const int64_t vocab = tiny_->checkpoint.config.vocab_size;
  auto ka1 = a->AllocateKv(1, 64, 6), ka2 = a->AllocateKv(2, 64, 6);
  auto kb1 = b->AllocateKv(1, 64, 6), kb2 = b->AllocateKv(2, 64, 6);
  ASSERT_TRUE(ka1.ok() && ka2.ok() && kb1.ok() && kb2.ok());
  const std::vector<int32_t> p1 = RandomPrompt(30, static_cast<int32_t>(vocab), 41);
  const std::vector<int32_t> p2 = RandomPrompt(12, static_cast<int32_t>(vocab), 42);
  int32_t len1 = 0, len2 = 0;
  const std::vector<SparseStepSeq> ids = {{1, 6}, {2, 6}};
  for (int step = 0; step < 16; ++step) {
    // Sequence 2 decodes from step 1 on while sequence 1's prompt arrives in chunks of 3 (mixed
    // steps).
    const int32_t n1 = len1 < 30 ? 3 : 1, n2 = len2 == 0 ? 12 : 1;
    std::vector<ForwardSeq> fa = {
        {std::span<const int32_t>(p1.data() + (len1 < 30 ? len1 : 29), n1), len1, ka1->get()},
        {std::span<const int32_t>(p2.data() + (len2 == 0 ? 0 : 11), n2), len2, ka2->get()}};
    std::vector<ForwardSeq> fb = {{fa[0].tokens, len1, kb1->get()},
                                  {fa[1].tokens, len2, kb2->get()}};
    Tensor host = Tensor::HostEmpty(DType::kF32, {2, vocab});
    ASSERT_TRUE(a->Forward(fa, ids, &host).ok()) << "step " << step;
    auto dev = b->ForwardDevice(fb, ids);
    ASSERT_TRUE(dev.ok()) << dev.status();
    ASSERT_EQ(dev->shape(), (Shape{2, vocab}));
    Tensor down = Tensor::HostEmpty(DType::kF32, {2, vocab});
    ASSERT_TRUE(tiny_->backend->ToHost(*dev, &down).ok());
    ASSERT_EQ(std::memcmp(down.data(), host.data(), host.nbytes()), 0) << "step " << step;
    len1 += n1;
    len2 += n2;
  }
  EXPECT_GT(b->stats().sparse_steps, 5);
}

TEST_F(SparseEngineTest, LayersReturnToTheDeviceWhenSequencesFinish) {
  constexpr int32_t kB = 6, kGrow = 8;
  const int32_t vocab = static_cast<int32_t>(tiny_->checkpoint.config.vocab_size);
  const std::vector<int32_t> short_prompt = RandomPrompt(5, vocab, 31);
  EngineOptions eo;
  eo.sparse = MakeDecoder(*tiny_, kB);
  Engine ref(tiny_->model.get(), nullptr, eo);
  const std::vector<int32_t> want_long = Greedy(ref, prompt_, 40),
                             want_short = Greedy(ref, short_prompt, 6);
  std::shared_ptr<SparseDecoder> probe;
  const int64_t limit = LimitForAbout30Rows(*tiny_, kB, &probe);
  auto dec = MakeDecoder(*tiny_, kB, limit, 1, SelectionMode::kHeadLevel, kGrow);
  eo.sparse = dec;
  Engine e(tiny_->model.get(), nullptr, eo);
  const int32_t n_layers = static_cast<int32_t>(tiny_->checkpoint.config.num_hidden_layers);
  // A long sequence moves layers to host; a short one after it finds room again: the layers come
  // back, and it decodes as with every layer resident; a second long one moves them to host again.
  EXPECT_EQ(Greedy(e, prompt_, 40), want_long);
  EXPECT_LT(dec->gpu_layers(), n_layers);
  const int64_t moves = e.sparse_stats().layer_moves;
  EXPECT_GT(moves, 0);
  EXPECT_EQ(Greedy(e, short_prompt, 6), want_short);
  EXPECT_EQ(dec->gpu_layers(), n_layers);
  EXPECT_EQ(e.sparse_stats().layer_returns, moves);
  EXPECT_EQ(e.sparse_stats().offloaded_layers, 0);
  EXPECT_EQ(Greedy(e, prompt_, 40), want_long);
  EXPECT_GT(e.sparse_stats().layer_moves, moves);
  // An operator's cap holds: layers do not come back above it.
  ASSERT_TRUE(dec->OffloadLayers(1).ok());
  EXPECT_EQ(Greedy(e, short_prompt, 6), want_short);
  EXPECT_EQ(dec->gpu_layers(), 1);
}

// A binding device limit (the backend's allocator cap, as --gpu-memory-limit sets it) between "every layer
// offloaded" and "every layer resident" for 16 concurrent prompts of 256 tokens: the planner fills the cap
// with KV up to its bound of a step's transient bytes, so every request must complete, and the bound must
// cover the transient bytes the backend saw.
TEST_F(SparseEngineTest, BindingDeviceLimitCompletesConcurrentLongPrompts) {
  constexpr int32_t kB = 16, kStreams = 16, kPrompt = 256, kOut = 16;
  std::shared_ptr<SparseDecoder> probe = MakeDecoder(*tiny_, kB, int64_t{1} << 40);
  const MemoryPlanner& p = *probe->planner();
  const int32_t n_layers = static_cast<int32_t>(tiny_->checkpoint.config.num_hidden_layers);
  const int64_t tokens = int64_t{kStreams} * (kPrompt + kOut);
  const double all_off = p.PredictBytes(n_layers, tokens, kStreams), all_in = p.PredictBytes(0, tokens, kStreams);
  const int64_t limit =
      static_cast<int64_t>(all_off + 0.35 * (all_in - all_off)) + probe->device_head().weight_bytes();
  probe.reset();
  auto t = testing::LoadTiny(7, limit);
  ASSERT_TRUE(t.ok()) << t.status();
  Tiny& tiny = **t;
  EngineOptions eo;
  std::shared_ptr<SparseDecoder> dec = MakeDecoder(tiny, kB, limit);
  ASSERT_NE(dec, nullptr);
  eo.sparse = dec;
  Engine e(tiny.model.get(), nullptr, eo);
  const int32_t vocab = static_cast<int32_t>(tiny.checkpoint.config.vocab_size);
  std::vector<std::vector<int32_t>> got(kStreams);
  std::vector<absl::Status> status(kStreams);
  int done = 0;
  for (int i = 0; i < kStreams; ++i) {
    GenerationRequest r;
    r.prompt = RandomPrompt(kPrompt, vocab, 100 + i);
    r.max_new_tokens = kOut;
    r.ignore_eos = true;
    ASSERT_TRUE(e.Submit(r, [&, i](const StreamEvent& ev) {
                   if (ev.token >= 0) got[i].push_back(ev.token);
                   if (ev.done) {
                     status[i] = ev.status;
                     ++done;
                   }
                 }).ok());
  }
  while (e.HasWork()) ASSERT_TRUE(e.Step().ok());
  EXPECT_EQ(done, kStreams);
  for (int i = 0; i < kStreams; ++i) {
    EXPECT_TRUE(status[i].ok()) << "request " << i << ": " << status[i];
    EXPECT_EQ(got[i].size(), static_cast<size_t>(kOut)) << "request " << i;
  }
  // The planner's step bound covers every transient byte the backend saw (workspace) and layers did move.
  const MemoryReport rep = tiny.backend->memory_report();
  EXPECT_LE(rep.peak, limit);
  EXPECT_LE(rep.peak_bytes[static_cast<size_t>(MemoryKind::kWorkspace)], dec->planner()->config().measured.workspace);
  EXPECT_GT(e.sparse_stats().layer_moves, 0);
  std::cerr << "limit " << limit << " peak " << rep.peak << " fixed " << dec->planner()->fixed_bytes()
            << " workspace bound " << dec->planner()->config().measured.workspace << " workspace peak "
            << rep.peak_bytes[static_cast<size_t>(MemoryKind::kWorkspace)] << "\n";
}

}  // namespace
}  // namespace specontext
