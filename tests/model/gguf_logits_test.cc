// A model loaded from GGUF computes the logits of the same model loaded from an HF directory, on
// the CPU backend: the tiny HF checkpoints written to F32 GGUF as llama.cpp's converter does (llama
// q/k rows permuted), and quantized random models against an HF directory of their dequantized
// weights. Equal weights through the same code give bit-identical logits, so any naming, layout or
// permutation slip shows as a difference.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "core/io/safetensors.h"
#include "core/model/transformer.h"
#include "tests/io/gguf_model_writer.h"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;
using testing::GgufWriter;
using testing::HfGgufTensor;

// Logits of every position of `tokens` [n, vocab] for the checkpoint at `path`.
std::vector<float> Logits(const std::string& path, const std::vector<int32_t>& tokens) {
  absl::StatusOr<Checkpoint> ckpt = OpenCheckpoint(path);
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  if (!ckpt.ok()) return {};
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  auto model = Transformer::Load(*ckpt, backend.get());
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  const int64_t n = static_cast<int64_t>(tokens.size()), vocab = ckpt->config.vocab_size;
  auto kv = (*model)->AllocateKv(static_cast<int32_t>(n)).value();
  Tensor logits = Tensor::HostEmpty(DType::kF32, {n, vocab});
  ForwardSeq seq{tokens, 0, kv.get()};
  EXPECT_TRUE((*model)->Forward({&seq, 1}, true, &logits).ok());
  return std::vector<float>(logits.as<float>(), logits.as<float>() + n * vocab);
}

// Bit-identical unless `rel_tol` > 0: llama3 RoPE scaling reaches a GGUF model as f32 per-frequency
// factors (rope_freqs), whose rounding moves the angles by ~1e-7 relative.
void ExpectSameLogits(const std::vector<float>& gguf, const std::vector<float>& hf,
                      double rel_tol = 0) {
  ASSERT_EQ(gguf.size(), hf.size());
  ASSERT_FALSE(hf.empty());
  double worst = 0, scale = 0;
  for (size_t i = 0; i < hf.size(); ++i) {
    ASSERT_TRUE(std::isfinite(gguf[i])) << i;
    worst = std::max(worst, std::fabs(double{gguf[i]} - hf[i]));
    scale = std::max(scale, std::fabs(double{hf[i]}));
  }
  std::printf("max |GGUF - HF directory| logit difference: %.3g (max |logit| %.3g)\n", worst,
              scale);
  EXPECT_LE(worst, rel_tol * scale);
}

std::vector<int32_t> Tokens(int64_t vocab) {
  std::vector<int32_t> t;
  for (int i = 0; i < 13; ++i) t.push_back(static_cast<int32_t>((i * 37 + 5) % vocab));
  return t;
}

class TinyGgufLogits : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyGgufLogits, EqualTheHfDirectory) {
  const std::string dir = std::string(SPECONTEXT_TEST_DATA "/tiny/") + GetParam();
  absl::StatusOr<Checkpoint> hf = OpenCheckpoint(dir);
  ASSERT_TRUE(hf.ok()) << hf.status();
  GgufWriter w;
  testing::WriteModelMetadata(hf->config, w);
  testing::WriteModelTensors(hf->config, testing::HfGgufTensorsOf(*hf), w);
  testing::ScratchDir scratch;
  testing::WriteFile(scratch.Path("m.gguf"), w.Build());
  const std::vector<int32_t> tokens = Tokens(hf->config.vocab_size);
  ExpectSameLogits(Logits(scratch.Path("m.gguf"), tokens), Logits(dir, tokens),
                   hf->config.rope_scaling.type == "llama3" ? 1e-5 : 0);
}

INSTANTIATE_TEST_SUITE_P(Tiny, TinyGgufLogits,
                         ::testing::Values("tiny-llama", "tiny-llama-bias", "tiny-llama-tied-gqa",
                                           "tiny-mqa", "tiny-qwen2", "tiny-qwen3"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n)
                             ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return n;
                         });

class QuantizedGgufLogits : public ::testing::TestWithParam<std::tuple<Architecture, GgmlType>> {};

// A quantized GGUF model against an HF directory holding its dequantized weights (f32 safetensors).
TEST_P(QuantizedGgufLogits, EqualTheDequantizedHfDirectory) {
  const auto [arch, type] = GetParam();
  ModelConfig c;
  c.arch = arch;
  c.model_type = arch == Architecture::kLlama   ? "llama"
                 : arch == Architecture::kQwen2 ? "qwen2"
                                                : "qwen3";
  c.vocab_size = 50;
  c.hidden_size = 256;
  c.intermediate_size = 256;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;  // q_dim 256: whole K-quant blocks in o_proj's rows
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000;
  c.attention_bias = arch == Architecture::kQwen2;
  c.qk_norm = arch == Architecture::kQwen3;
  c.tie_word_embeddings = arch != Architecture::kLlama;
  c.torch_dtype = "float32";
  std::mt19937_64 rng(testing::FreshSeed());
  const std::vector<HfGgufTensor> tensors = testing::RandomHfGgufTensors(c, type, rng);
  testing::ScratchDir scratch;
  GgufWriter w;
  testing::WriteModelMetadata(c, w);
  testing::WriteModelTensors(c, tensors, w);
  testing::WriteFile(scratch.Path("m.gguf"), w.Build());
  // The HF directory: config.json and the dequantized weights in HF layout.
  fs::create_directories(scratch.Path("hf"));
  testing::WriteFile(scratch.Path("hf/config.json"), ModelConfigToJson(c));
  std::vector<std::vector<float>> values;
  std::vector<std::pair<std::string, Tensor>> hf_tensors;
  for (const HfGgufTensor& t : tensors) {
    values.push_back(t.Values());
    hf_tensors.emplace_back(t.hf_name, Tensor(values.back().data(), DType::kF32, t.shape));
  }
  ASSERT_TRUE(WriteSafetensors(scratch.Path("hf/model.safetensors"), hf_tensors).ok());
  const std::vector<int32_t> tokens = Tokens(c.vocab_size);
  ExpectSameLogits(Logits(scratch.Path("m.gguf"), tokens), Logits(scratch.Path("hf"), tokens));
}

INSTANTIATE_TEST_SUITE_P(Types, QuantizedGgufLogits,
                         ::testing::Values(std::make_tuple(Architecture::kLlama, GgmlType::kQ4_K),
                                           std::make_tuple(Architecture::kLlama, GgmlType::kQ8_0),
                                           std::make_tuple(Architecture::kQwen2, GgmlType::kQ5_0),
                                           std::make_tuple(Architecture::kQwen3, GgmlType::kQ6_K)),
                         [](const auto& info) {
                           const Architecture a = std::get<0>(info.param);
                           return std::string(a == Architecture::kLlama   ? "llama"
                                              : a == Architecture::kQwen2 ? "qwen2"
                                                                          : "qwen3") +
                                  "_" + GgmlTypeName(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace specontext
