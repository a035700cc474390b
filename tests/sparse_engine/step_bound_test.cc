// The memory planner's step bound counts the buffers the backend's attention keeps between steps
// (Backend::AttentionWorkspaceBytes): a CPU backend that reports some, at the shapes it is asked about, must
// see them in Transformer::ForwardWorkspaceBytes (dense mode's auto KV budget) and in SparseStepWorkspaceBytes
// once, at the largest step with the sparse fields of the decoder. The CUDA side (the bytes against what the
// kernels allocate) is tests/cuda/cuda_attention_workspace_test.cc.
#include <gtest/gtest.h>

#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/sparse/index_sets.h"
#include "core/sparse/retrieval_head_device.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext {
namespace {

// Reports attention bytes that depend on every field of the shape, and records the shapes asked about.
class SpyCpuBackend : public CpuBackend {
 public:
  SpyCpuBackend() : CpuBackend(0) {}
  int64_t AttentionWorkspaceBytes(const AttentionWorkspaceShape& s) const override {
    shapes.push_back(s);
    return Bytes(s);
  }
  static int64_t Bytes(const AttentionWorkspaceShape& s) {
    return 1000003 * s.max_seqs + 10007 * s.max_tokens + 101 * (s.n_layers + s.n_heads + s.n_kv_heads + s.head_dim) +
           7 * int64_t{s.budget} * s.max_context + 13 * s.sets_per_seq + 17 * s.select_q_heads +
           (s.dense_fallback ? 5000011 : 0);
  }
  mutable std::vector<AttentionWorkspaceShape> shapes;
};

struct Loaded {
  Checkpoint checkpoint;
  std::unique_ptr<Backend> plain;
  std::unique_ptr<SpyCpuBackend> spy;
  std::unique_ptr<Transformer> on_plain, on_spy;
  std::unique_ptr<RetrievalHead> head;
};

std::unique_ptr<Loaded> Load() {
  auto files = testing::TinyFiles(7);
  EXPECT_TRUE(files.ok()) << files.status();
  if (!files.ok()) return nullptr;
  auto l = std::make_unique<Loaded>();
  auto ck = OpenCheckpoint(files->first);
  EXPECT_TRUE(ck.ok()) << ck.status();
  if (!ck.ok()) return nullptr;
  l->checkpoint = *std::move(ck);
  l->plain = MakeCpuBackend();
  l->spy = std::make_unique<SpyCpuBackend>();
  auto a = Transformer::Load(l->checkpoint, l->plain.get());
  auto b = Transformer::Load(l->checkpoint, l->spy.get());
  auto h = RetrievalHead::Load(files->second, l->checkpoint.config, l->checkpoint.weights.get());
  EXPECT_TRUE(a.ok() && b.ok() && h.ok());
  if (!a.ok() || !b.ok() || !h.ok()) return nullptr;
  l->on_plain = *std::move(a);
  l->on_spy = *std::move(b);
  l->head = *std::move(h);
  return l;
}

void ExpectShape(const AttentionWorkspaceShape& s, const ModelConfig& c, int32_t seqs, int32_t tokens) {
  EXPECT_EQ(s.max_seqs, seqs);
  EXPECT_EQ(s.max_tokens, tokens);
  EXPECT_EQ(s.n_layers, c.num_hidden_layers);
  EXPECT_EQ(s.n_heads, c.num_attention_heads);
  EXPECT_EQ(s.n_kv_heads, c.num_key_value_heads);
  EXPECT_EQ(s.head_dim, c.head_dim);
}

TEST(StepBound, ForwardWorkspaceCountsTheAttentionBuffersOfItsShape) {
  auto l = Load();
  ASSERT_NE(l, nullptr);
  const ModelConfig& c = l->on_spy->config();
  for (auto [n, seqs] : {std::pair<int64_t, int64_t>{97, 5}, {17, 17}, {1, 1}}) {
    EXPECT_EQ(l->on_plain->ForwardWorkspaceBytes(n, seqs), l->on_spy->ForwardWorkspaceBytes(n, seqs, false));
    l->spy->shapes.clear();
    const int64_t with = l->on_spy->ForwardWorkspaceBytes(n, seqs);
    ASSERT_EQ(l->spy->shapes.size(), 1u);
    const AttentionWorkspaceShape& s = l->spy->shapes[0];
    ExpectShape(s, c, static_cast<int32_t>(seqs), static_cast<int32_t>(n));
    EXPECT_EQ(s.budget, 0);  // dense attention only
    EXPECT_FALSE(s.dense_fallback);
    EXPECT_EQ(with, l->on_spy->ForwardWorkspaceBytes(n, seqs, false) + SpyCpuBackend::Bytes(s));
    // The CPU backend keeps no attention buffers on the device.
    EXPECT_EQ(l->on_plain->ForwardWorkspaceBytes(n, seqs), l->on_plain->ForwardWorkspaceBytes(n, seqs, false));
  }
}

TEST(StepBound, SparseStepBoundCountsTheAttentionBuffersOnceAtTheLargestStep) {
  auto l = Load();
  ASSERT_NE(l, nullptr);
  const ModelConfig& c = l->on_spy->config();
  auto dplain = DeviceRetrievalHead::Create(*l->head, l->plain.get(), nullptr);
  auto dspy = DeviceRetrievalHead::Create(*l->head, l->spy.get(), nullptr);
  ASSERT_TRUE(dplain.ok() && dspy.ok());
  struct Case {
    bool with_head;
    SparseStepShape step;
    int32_t context, budget;
    SelectionMode mode;
    bool fallback;
  };
  for (const Case& k : {Case{true, {97, 5}, 200, 33, SelectionMode::kHeadLevel, true},
                        Case{true, {17, 9}, 0, 17, SelectionMode::kBatchLevel, false},
                        Case{false, {256, 32}, 129, 64, SelectionMode::kHeadLevel, false}}) {
    const DeviceRetrievalHead* hp = k.with_head ? dplain->get() : nullptr;
    const DeviceRetrievalHead* hs = k.with_head ? dspy->get() : nullptr;
    l->spy->shapes.clear();
    const int64_t spy =
        SparseStepWorkspaceBytes(*l->on_spy, hs, k.step, k.context, k.budget, k.mode, false, k.fallback);
    const int64_t plain =
        SparseStepWorkspaceBytes(*l->on_plain, hp, k.step, k.context, k.budget, k.mode, false, k.fallback);
    // Asked once: the forwards' terms leave the attention buffers to the bound's kept bytes.
    ASSERT_EQ(l->spy->shapes.size(), 1u);
    const AttentionWorkspaceShape& s = l->spy->shapes[0];
    const int32_t seqs = k.step.max_batch, tokens = std::max(k.step.max_tokens_per_step, seqs);
    ExpectShape(s, c, seqs, tokens);
    EXPECT_EQ(s.budget, k.budget);
    EXPECT_EQ(s.max_context, ContextLimit(k.context, c.max_position_embeddings));
    EXPECT_EQ(s.sets_per_seq, k.mode == SelectionMode::kHeadLevel ? c.num_key_value_heads : 1);
    EXPECT_EQ(s.select_q_heads, k.with_head ? (*dspy)->n_heads() : 0);
    EXPECT_EQ(s.dense_fallback, k.fallback);
    EXPECT_EQ(spy, plain + SpyCpuBackend::Bytes(s));
  }
}

}  // namespace
}  // namespace specontext
