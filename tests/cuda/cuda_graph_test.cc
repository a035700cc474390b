// CUDA graphs of the dense decode step (Backend::RunStepGraph, core/model/transformer_graph.cc): logits
// of replayed steps must be bitwise those of the same steps run op by op, over many steps with growing,
// ragged lengths, sequences joining and leaving (so the batch size, the sequences behind each row and
// the attention split counts all change), and a large prefill in between that moves the backend's
// metadata buffers (forcing a recapture).
#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "core/cuda/cuda_backend_impl.h"
#include "core/model/transformer.h"
#include "core/status_macros.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/model/random_model.h"

namespace specontext::testing {
namespace {

ModelConfig GraphConfig(int64_t heads, int64_t kv_heads, int64_t head_dim) {
  ModelConfig c = TinyConfig(Architecture::kLlama, kv_heads);
  c.vocab_size = 301;
  c.hidden_size = 96;
  c.intermediate_size = 136;
  c.num_hidden_layers = 3;
  c.num_attention_heads = heads;
  c.head_dim = head_dim;
  c.max_position_embeddings = 4096;
  return c;
}

// One live sequence, run twice: `kv_graph` through graphs, `kv_eager` op by op.
struct Seq {
  std::unique_ptr<SequenceKv> kv_graph, kv_eager;
  std::vector<int32_t> tokens;
  int32_t cached = 0;
};

absl::Status Prefill(Transformer& model, Seq& s, int32_t vocab) {
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, vocab});
  const std::span<const int32_t> prompt(s.tokens.data(), s.tokens.size());
  for (SequenceKv* kv : {s.kv_graph.get(), s.kv_eager.get()}) {
    ForwardSeq f{prompt, 0, kv};
    RETURN_IF_ERROR(model.Forward({&f, 1}, false, &logits));
  }
  s.cached = static_cast<int32_t>(s.tokens.size());
  s.tokens.push_back(static_cast<int32_t>(std::max_element(logits.as<float>(), logits.as<float>() + vocab) -
                                          logits.as<float>()));
  return absl::OkStatus();
}

void RunReplayCase(const ModelConfig& c, uint32_t seed) {
  SPC_GPU_OR_SKIP(gpu);
  auto* cuda = dynamic_cast<cuda::CudaBackend*>(gpu.get());
  ASSERT_NE(cuda, nullptr);
  Checkpoint ck = RandomCheckpoint(c, seed);
  auto model_or = Transformer::Load(ck, gpu.get());
  ASSERT_TRUE(model_or.ok()) << model_or.status();
  Transformer& model = **model_or;
  std::mt19937 rng(seed);
  const int32_t vocab = static_cast<int32_t>(c.vocab_size);
  std::vector<Seq> live;
  auto add_seq = [&](int32_t prompt_len) {
    Seq s;
    s.kv_graph = *model.AllocateKv(3000);
    s.kv_eager = *model.AllocateKv(3000);
    for (int32_t i = 0; i < prompt_len; ++i) s.tokens.push_back(static_cast<int32_t>(rng() % vocab));
    ASSERT_TRUE(Prefill(model, s, vocab).ok());
    live.push_back(std::move(s));
  };
  for (int32_t len : {5, 140, 700}) add_seq(len);
  const auto before = cuda->graph_stats();
  int64_t compared = 0;
  for (int step = 0; step < 48; ++step) {
    if (step == 12) add_seq(1200);                     // a new, longer sequence joins
    if (step == 20) live.erase(live.begin());          // the first one leaves
    if (step == 30) add_seq(2100);                     // bigger prefill: metadata buffers may move
    if (step == 38) std::swap(live.front(), live.back());  // same size, other sequences per row
    // A random non-empty subset decodes this step, in random order.
    std::vector<Seq*> batch;
    for (Seq& s : live) {
      if (rng() % 4 != 0) batch.push_back(&s);
    }
    if (batch.empty()) batch.push_back(&live.back());
    std::shuffle(batch.begin(), batch.end(), rng);
    const int64_t n = static_cast<int64_t>(batch.size());
    Tensor got = Tensor::HostEmpty(DType::kF32, {n, vocab}), want = Tensor::HostEmpty(DType::kF32, {n, vocab});
    for (bool graphs : {true, false}) {
      std::vector<ForwardSeq> fwd;
      for (Seq* s : batch) {
        fwd.push_back({std::span<const int32_t>(&s->tokens[s->cached], 1), s->cached,
                       graphs ? s->kv_graph.get() : s->kv_eager.get()});
      }
      gpu->set_step_graphs(graphs);
      const absl::Status st = model.Forward(fwd, false, graphs ? &got : &want);
      ASSERT_TRUE(st.ok()) << st;
    }
    ASSERT_EQ(std::memcmp(got.data(), want.data(), got.nbytes()), 0)
        << "step " << step << ", batch " << n << ": graph replay logits differ from the op-by-op run";
    ++compared;
    for (int64_t i = 0; i < n; ++i) {
      const float* row = got.as<float>() + i * vocab;
      ++batch[i]->cached;
      batch[i]->tokens.push_back(static_cast<int32_t>(std::max_element(row, row + vocab) - row));
    }
  }
  const auto after = cuda->graph_stats();
  EXPECT_EQ(compared, 48);
  EXPECT_EQ(after.fallbacks, before.fallbacks) << "a decode step could not be recorded";
  EXPECT_GE(after.captures - before.captures, 2);
  EXPECT_GT(after.replays - before.replays, after.captures - before.captures)
      << "graphs were captured but rarely replayed";
  EXPECT_GT(gpu->memory_report().bytes[static_cast<size_t>(MemoryKind::kGraphs)], 0);
}

TEST(CudaGraphTest, ReplayIsBitwiseOpByOpGqa4Hd64) { RunReplayCase(GraphConfig(8, 2, 64), FreshSeed()); }
TEST(CudaGraphTest, ReplayIsBitwiseOpByOpMqaHd128) { RunReplayCase(GraphConfig(8, 1, 128), FreshSeed()); }
TEST(CudaGraphTest, ReplayIsBitwiseOpByOpMhaHd64) { RunReplayCase(GraphConfig(4, 4, 64), FreshSeed()); }
// Head dim 12: the simple attention kernel (no split plan) is recorded as well.
TEST(CudaGraphTest, ReplayIsBitwiseOpByOpSimpleKernel) { RunReplayCase(GraphConfig(4, 2, 12), FreshSeed()); }

TEST(CudaGraphTest, ModelDestructionDropsItsGraphs) {
  SPC_GPU_OR_SKIP(gpu);
  const ModelConfig c = GraphConfig(8, 2, 64);
  Checkpoint ck = RandomCheckpoint(c, FreshSeed());
  {
    auto model = *Transformer::Load(ck, gpu.get());
    auto kv = *model->AllocateKv(64);
    std::vector<int32_t> tok = {3, 4};
    Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
    for (int i = 0; i < 2; ++i) {
      ForwardSeq f{std::span<const int32_t>(&tok[i], 1), i, kv.get()};
      ASSERT_TRUE(model->Forward({&f, 1}, false, &logits).ok());
    }
    EXPECT_GT(gpu->memory_report().bytes[static_cast<size_t>(MemoryKind::kGraphs)], 0);
  }
  EXPECT_EQ(gpu->memory_report().bytes[static_cast<size_t>(MemoryKind::kGraphs)], 0);
}

}  // namespace
}  // namespace specontext::testing
