// Batch-invariant mode of the CPU backend through the Transformer (Backend::set_batch_invariant): a prompt
// decoded greedily alone and inside batches of 2 and 9 other sequences of other lengths, once beside a chunked
// prefill (tests/common/batch_invariance.h), gives the alone run's logits bit for bit at every step, for f32
// and bf16 checkpoints. (Without the mode, Linear switches from the GEMV to sgemm above 8 rows and from sgemv
// to sgemm above one row, so a row's bits follow the batch.) The GPU version: tests/cuda/cuda_batch_invariant_test.cc.
#include <unistd.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/model/transformer.h"
#include "tests/common/batch_invariance.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext::testing {
namespace {

void CheckCheckpoint(DType dtype) {
  ModelConfig c = RandomCheckpointPreset("tiny-llama").value();
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  const std::string dir = (std::filesystem::temp_directory_path() /
                           absl::StrCat("spc_cpu_batch_invariant_", getpid(), "_", std::string(DTypeName(dtype))))
                              .string();
  RandomCheckpointOptions o;
  o.dtype = dtype;
  o.seed = 11;
  o.num_threads = 2;
  o.write_tokenizer = false;
  ASSERT_TRUE(WriteRandomCheckpoint(c, dir, o).ok());
  auto ck = OpenCheckpoint(dir);
  ASSERT_TRUE(ck.ok()) << ck.status();
  CpuBackend cpu(0);
  ASSERT_TRUE(cpu.set_batch_invariant(true).ok());
  auto model = Transformer::Load(*ck, &cpu);
  ASSERT_TRUE(model.ok()) << model.status();
  std::mt19937 rng(5);
  std::vector<int32_t> prompt(23);
  for (int32_t& t : prompt) t = std::uniform_int_distribution<int32_t>(3, 370)(rng);
  constexpr int kSteps = 6;
  const LogitsTrace alone = RunBatchScenario(**model, {}, prompt, {}, kSteps, 1);
  ASSERT_EQ(alone.logits.size(), size_t{kSteps + 1});
  for (const BatchScenario& s : {BatchScenario{2, false, 1, 60}, BatchScenario{9, false, 4, 60},
                                 BatchScenario{9, true, 9, 60}}) {
    const LogitsTrace t = RunBatchScenario(**model, s, prompt, alone.argmax, kSteps, 2);
    ExpectSameTrace(t, alone, absl::StrCat(std::string(DTypeName(dtype)), " checkpoint, ", ScenarioName(s)));
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

TEST(CpuBatchInvariantModel, F32CheckpointGivesTheAloneLogitsInEveryBatch) { CheckCheckpoint(DType::kF32); }
TEST(CpuBatchInvariantModel, Bf16CheckpointGivesTheAloneLogitsInEveryBatch) { CheckCheckpoint(DType::kBF16); }

}  // namespace
}  // namespace specontext::testing
