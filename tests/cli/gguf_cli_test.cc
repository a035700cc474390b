// `specontext generate` on a GGUF file: the tiny HF checkpoints written to GGUF as llama.cpp's
// converter does (tokenizer metadata included) generate the same text as their HF directories,
// greedily.
#include <gtest/gtest.h>

#include "core/io/weight_source.h"
#include "tests/common/cli_runner.h"
#include "tests/io/gguf_model_writer.h"
#include "tests/io/test_util.h"
#include "tests/tokenizer/gguf_from_hf.h"

namespace specontext {
namespace {

using testing::CliRun;
using testing::GgufWriter;

class GgufGenerate : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufGenerate, SameTextAsTheHfDirectory) {
  const std::string dir = std::string(SPECONTEXT_TEST_DATA "/tiny/") + GetParam();
  absl::StatusOr<Checkpoint> hf = OpenCheckpoint(dir);
  ASSERT_TRUE(hf.ok()) << hf.status();
  const GgufVocab v =
      testing::GgufVocabFromHf(testing::ReadFile(dir + "/tokenizer.json"), "{}", "gpt-2");
  GgufWriter w;
  testing::WriteModelMetadata(hf->config, w);
  w.Str("tokenizer.ggml.model", v.model).Str("tokenizer.ggml.pre", v.pre);
  w.Strings("tokenizer.ggml.tokens", v.tokens).I32s("tokenizer.ggml.token_type", v.token_types);
  // The tiny llama tokenizer's post-processor prepends <|begin_of_text|>: the converter records
  // that as add_bos_token (and the BOS id, written with the metadata).
  w.Strings("tokenizer.ggml.merges", v.merges);
  w.Bool("tokenizer.ggml.add_bos_token", hf->config.arch == Architecture::kLlama);
  testing::WriteModelTensors(hf->config, testing::HfGgufTensorsOf(*hf), w);
  testing::ScratchDir scratch;
  testing::WriteFile(scratch.Path("model.gguf"), w.Build());
  auto generate = [](const std::string& model) {
    return testing::RunCli(SPECONTEXT_CLI,
                           {"generate", "--model", model, "--prompt", "Once upon a time there was",
                            "--max-new-tokens", "16", "--temperature", "0", "--ignore-eos"});
  };
  const CliRun from_hf = generate(dir), from_gguf = generate(scratch.Path("model.gguf"));
  ASSERT_EQ(from_hf.exit_code, 0) << from_hf.err;
  ASSERT_EQ(from_gguf.exit_code, 0) << from_gguf.err;
  EXPECT_FALSE(from_gguf.out.empty());
  EXPECT_EQ(from_gguf.out, from_hf.out);
}

INSTANTIATE_TEST_SUITE_P(Tiny, GgufGenerate,
                         ::testing::Values("tiny-llama", "tiny-llama-bias", "tiny-qwen2",
                                           "tiny-qwen3"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n)
                             ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return n;
                         });

}  // namespace
}  // namespace specontext
