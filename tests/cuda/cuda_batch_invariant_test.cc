// Batch-invariant decoding through the Transformer on the GPU (CudaBackendOptions::batch_invariant).
//
// A random bf16 checkpoint shaped like SmolLM2-135M's layers (hidden 576, 9 query heads over 3 KV heads of
// 64, intermediate 1536; 4 layers, vocabulary 4,099) decodes one prompt greedily alone, then the same
// prompt inside batches with 2, 7 and 32 other sequences of other lengths (prefilled in the same step as the
// prompt), and with 7 others while a long prompt is prefilled chunk by chunk in the same steps as the
// decoding (tests/common/batch_invariance.h). With the mode on, the prompt's logits row must be bit for bit
// the one of the alone run at every step (the prefill step included) and its greedy tokens the same, with
// and without CUDA graphs. With the mode off the same runs print the largest logit difference, the bitwise
// equal steps and the argmax changes (no assertion: that dependence is what the mode removes).
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/cuda/cuda_backend.h"
#include "core/model/transformer.h"
#include "tests/common/batch_invariance.h"
#include "tests/cuda/cuda_test_util.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext::testing {
namespace {

constexpr int kPromptLen = 37;
constexpr int kDecodeSteps = 12;

struct Model {
  std::unique_ptr<Backend> gpu;
  std::unique_ptr<Transformer> model;
  std::string dir;
  ~Model() {
    model.reset();
    gpu.reset();
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
};

std::unique_ptr<Model> LoadModel(bool invariant) {
  CudaBackendOptions o;
  o.batch_invariant = invariant;
  auto m = std::make_unique<Model>();
  m->gpu = MakeGpuOrNull(o);
  if (m->gpu == nullptr) return nullptr;
  auto preset = RandomCheckpointPreset("tiny-llama");
  EXPECT_TRUE(preset.ok()) << preset.status();
  ModelConfig c = *preset;
  c.hidden_size = 576;
  c.intermediate_size = 1536;
  c.num_attention_heads = 9;
  c.num_key_value_heads = 3;
  c.head_dim = 64;
  c.num_hidden_layers = 4;
  c.vocab_size = 4099;
  m->dir = (std::filesystem::temp_directory_path() / absl::StrCat("spc_batch_invariant_", getpid())).string();
  RandomCheckpointOptions ro;
  ro.dtype = DType::kBF16;
  ro.seed = FreshSeed();
  ro.num_threads = 2;
  ro.write_tokenizer = false;
  const absl::Status w = WriteRandomCheckpoint(c, m->dir, ro);
  EXPECT_TRUE(w.ok()) << w;
  auto ck = OpenCheckpoint(m->dir);
  EXPECT_TRUE(ck.ok()) << ck.status();
  if (!ck.ok()) return nullptr;
  auto model = Transformer::Load(*ck, m->gpu.get());
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  m->model = *std::move(model);
  return m;
}

const BatchScenario kScenarios[] = {{2, false, 1}, {7, false, 4}, {32, false, 17}, {7, true, 3}};

std::vector<int32_t> Prompt(uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> prompt(kPromptLen);
  for (int32_t& t : prompt) t = std::uniform_int_distribution<int32_t>(3, 4000)(rng);
  return prompt;
}

TEST(CudaBatchInvariantModel, GreedyDecodeOfAPromptIsBitwiseTheSameWhateverItIsBatchedWith) {
  std::unique_ptr<Model> m = LoadModel(true);
  if (m == nullptr) GTEST_SKIP() << "no CUDA device (or the checkpoint failed, see above)";
  ASSERT_TRUE(m->gpu->batch_invariant());
  const uint32_t seed = FreshSeed();
  const std::vector<int32_t> prompt = Prompt(seed);
  const LogitsTrace alone = RunBatchScenario(*m->model, {}, prompt, {}, kDecodeSteps, seed + 1);
  ASSERT_EQ(alone.logits.size(), size_t{kDecodeSteps + 1});
  // Decode-only steps replay CUDA graphs with graphs on (the default): both ways must give the same bits.
  for (bool graphs : {true, false}) {
    m->gpu->set_step_graphs(graphs);
    for (const BatchScenario& s : kScenarios) {
      const LogitsTrace t = RunBatchScenario(*m->model, s, prompt, alone.argmax, kDecodeSteps, seed + 2);
      ExpectSameTrace(t, alone, absl::StrCat(ScenarioName(s), ", graphs ", graphs, " (seed ", seed, ")"));
    }
  }
}

TEST(CudaBatchInvariantModel, BatchDependenceWithTheModeOffIsOnlyReported) {
  std::unique_ptr<Model> m = LoadModel(false);
  if (m == nullptr) GTEST_SKIP() << "no CUDA device (or the checkpoint failed, see above)";
  const uint32_t seed = FreshSeed();
  const std::vector<int32_t> prompt = Prompt(seed);
  const LogitsTrace alone = RunBatchScenario(*m->model, {}, prompt, {}, kDecodeSteps, seed + 1);
  ASSERT_EQ(alone.logits.size(), size_t{kDecodeSteps + 1});
  for (const BatchScenario& s : kScenarios) {
    const LogitsTrace t = RunBatchScenario(*m->model, s, prompt, alone.argmax, kDecodeSteps, seed + 2);
    const TraceDiff d = Compare(t, alone);
    std::printf("[ info ] mode off, %s: max |logit diff| %g, bitwise-equal steps %d/%zu, argmax changes %d\n",
                ScenarioName(s).c_str(), d.max_abs, d.equal_steps, t.logits.size(), d.argmax_changes);
  }
}

}  // namespace
}  // namespace specontext::testing
