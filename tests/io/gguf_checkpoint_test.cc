// GGUF files as checkpoints: the tiny HF checkpoints written to GGUF as llama.cpp's converter does
// open to the same config and tensors; random tiny llama/qwen2/qwen3 files in float and quantized
// types dequantize and un-permute to what was written; metadata mapping and refusals.
#include "core/io/gguf_checkpoint.h"

#include <cstring>
#include <filesystem>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/gguf_model_writer.h"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;
using testing::GgufWriter;
using ::testing::HasSubstr;
using testing::HfGgufTensor;

std::vector<std::string> TinyCheckpoints() {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(SPECONTEXT_TEST_DATA "/tiny"))
    names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

std::string Write(const testing::ScratchDir& dir, const GgufWriter& w,
                  const std::string& name = "model.gguf") {
  testing::WriteFile(dir.Path(name), w.Build());
  return dir.Path(name);
}

// Every tensor of `ckpt` equals the expected values bit for bit (as f32), with the expected dtype.
void ExpectTensors(const Checkpoint& ckpt, const std::vector<HfGgufTensor>& expected) {
  for (const HfGgufTensor& e : expected) {
    absl::StatusOr<Tensor> t = ckpt.weights->Get(e.hf_name);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->shape(), e.shape) << e.hf_name;
    const DType want = e.type == GgmlType::kF16    ? DType::kF16
                       : e.type == GgmlType::kBF16 ? DType::kBF16
                                                   : DType::kF32;
    EXPECT_EQ(t->dtype(), want) << e.hf_name;
    std::vector<float> got(t->numel());
    ConvertToF32(t->data(), t->dtype(), got.data(), got.size());
    const std::vector<float> values = e.Values();
    ASSERT_EQ(values.size(), got.size());
    EXPECT_EQ(std::memcmp(values.data(), got.data(), got.size() * 4), 0) << e.hf_name << " differs";
  }
}

class HfRoundTrip : public ::testing::TestWithParam<std::string> {};

// The HF tiny checkpoint written as F32 GGUF (llama q/k permuted as the converter does) opens to
// the same config and bit-identical tensors.
TEST_P(HfRoundTrip, SameConfigAndTensors) {
  absl::StatusOr<Checkpoint> hf =
      OpenCheckpoint(std::string(SPECONTEXT_TEST_DATA "/tiny/") + GetParam());
  ASSERT_TRUE(hf.ok()) << hf.status();
  const std::vector<HfGgufTensor> tensors = testing::HfGgufTensorsOf(*hf);
  GgufWriter w;
  testing::WriteModelMetadata(hf->config, w);
  testing::WriteModelTensors(hf->config, tensors, w);
  testing::ScratchDir dir;
  absl::StatusOr<Checkpoint> g = OpenCheckpoint(Write(dir, w));
  ASSERT_TRUE(g.ok()) << g.status();
  const ModelConfig &a = hf->config, &b = g->config;
  EXPECT_EQ(b.arch, a.arch);
  EXPECT_EQ(b.vocab_size, a.vocab_size);
  EXPECT_EQ(b.hidden_size, a.hidden_size);
  EXPECT_EQ(b.intermediate_size, a.intermediate_size);
  EXPECT_EQ(b.num_hidden_layers, a.num_hidden_layers);
  EXPECT_EQ(b.num_attention_heads, a.num_attention_heads);
  EXPECT_EQ(b.num_key_value_heads, a.num_key_value_heads);
  EXPECT_EQ(b.head_dim, a.head_dim);
  EXPECT_EQ(b.max_position_embeddings, a.max_position_embeddings);
  EXPECT_FLOAT_EQ(b.rms_norm_eps, a.rms_norm_eps);
  EXPECT_FLOAT_EQ(b.rope_theta, a.rope_theta);
  EXPECT_EQ(b.tie_word_embeddings, a.tie_word_embeddings);
  EXPECT_EQ(b.attention_bias, a.attention_bias);
  EXPECT_EQ(b.o_proj_bias, a.o_proj_bias);
  EXPECT_EQ(b.mlp_bias, a.mlp_bias);
  EXPECT_EQ(b.qk_norm, a.qk_norm);
  // llama3 RoPE scaling arrives as the converter's rope_freqs factors instead of parameters.
  EXPECT_EQ(b.rope_scaling.freq_factors.size(),
            a.rope_scaling.type == "llama3" ? a.head_dim / 2 : 0);
  if (a.rope_scaling.type != "llama3") {
    EXPECT_EQ(b.rope_scaling.type, a.rope_scaling.type);
  }
  EXPECT_EQ(g->generation.bos_token_id, a.bos_token_id);
  EXPECT_FALSE(g->generation.do_sample);
  ExpectTensors(*g, tensors);
}

INSTANTIATE_TEST_SUITE_P(Tiny, HfRoundTrip, ::testing::ValuesIn(TinyCheckpoints()),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n)
                             ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return n;
                         });

ModelConfig TinyConfig(Architecture arch) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = 64;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000;
  c.attention_bias = arch == Architecture::kQwen2;
  c.qk_norm = arch == Architecture::kQwen3;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

class QuantizedTiny : public ::testing::TestWithParam<std::tuple<Architecture, GgmlType>> {};

// Random tiny checkpoints with matrices in each supported type: Get returns the dequantized,
// un-permuted HF tensors; F16/BF16/F32 matrices stay in their dtype (views of the mapping unless
// permuted).
TEST_P(QuantizedTiny, DequantizesAndUnpermutes) {
  const auto [arch, type] = GetParam();
  const ModelConfig c = TinyConfig(arch);
  std::mt19937_64 rng(testing::FreshSeed());
  const std::vector<HfGgufTensor> tensors = testing::RandomHfGgufTensors(c, type, rng);
  GgufWriter w;
  testing::WriteModelMetadata(c, w);
  testing::WriteModelTensors(c, tensors, w);
  testing::ScratchDir dir;
  absl::StatusOr<Checkpoint> g = OpenCheckpoint(Write(dir, w));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->config.attention_bias, c.attention_bias);
  EXPECT_EQ(g->config.qk_norm, c.qk_norm);
  ExpectTensors(*g, tensors);
  const std::string down = "model.layers.1.mlp.down_proj.weight";
  const WeightInfo info = g->weights->Info(down).value();
  const auto it = std::find_if(tensors.begin(), tensors.end(),
                               [&](const HfGgufTensor& t) { return t.hf_name == down; });
  EXPECT_EQ(info.stored_bytes, it->bytes.size());
  EXPECT_EQ(info.shape, (Shape{256, 512}));
  // Unpermuted float tensors are views of the mapping (the same address each time); others are
  // copies.
  const std::string up = "model.layers.0.mlp.up_proj.weight";
  const bool view = type == GgmlType::kF32 || type == GgmlType::kF16 || type == GgmlType::kBF16;
  EXPECT_EQ(g->weights->Get(up)->data() == g->weights->Get(up)->data(), view);
}

INSTANTIATE_TEST_SUITE_P(
    Types, QuantizedTiny,
    ::testing::Combine(
        ::testing::Values(Architecture::kLlama, Architecture::kQwen2, Architecture::kQwen3),
        ::testing::Values(GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0,
                          GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1,
                          GgmlType::kQ2_K, GgmlType::kQ3_K, GgmlType::kQ4_K, GgmlType::kQ5_K,
                          GgmlType::kQ6_K)),
    [](const auto& info) {
      const Architecture a = std::get<0>(info.param);
      return std::string(a == Architecture::kLlama   ? "llama"
                         : a == Architecture::kQwen2 ? "qwen2"
                                                     : "qwen3") +
             "_" + GgmlTypeName(std::get<1>(info.param));
    });

}  // namespace
}  // namespace specontext

namespace specontext {
namespace {

// Llama with q/k/v biases (attention_bias): the converter permutes q_proj.bias and k_proj.bias like
// the weight rows, element by element; Get undoes it.
TEST(GgufLlamaBiases, AreUnpermuted) {
  for (GgmlType type : {GgmlType::kF32, GgmlType::kQ8_0}) {
    ModelConfig c;
    c.arch = Architecture::kLlama;
    c.vocab_size = 40;
    c.hidden_size = 64;
    c.intermediate_size = 64;
    c.num_hidden_layers = 1;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.max_position_embeddings = 32;
    c.attention_bias = true;
    std::mt19937_64 rng(testing::FreshSeed());
    const std::vector<HfGgufTensor> tensors = testing::RandomHfGgufTensors(c, type, rng);
    GgufWriter w;
    testing::WriteModelMetadata(c, w);
    testing::WriteModelTensors(c, tensors, w);
    testing::ScratchDir dir;
    absl::StatusOr<Checkpoint> g = OpenCheckpoint(Write(dir, w));
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_TRUE(g->config.attention_bias);
    ASSERT_TRUE(g->weights->Has("model.layers.0.self_attn.k_proj.bias"));
    ExpectTensors(*g, tensors);
  }
}

// Files from the gguf Python package's own writer (the fuzz seed corpus, made by
// tools/reference/make_gguf_fuzz_corpus.py) parse with every value intact, and its tiny models
// open.
TEST(GgufPyFiles, ParseAndOpen) {
  const std::string dir = SPECONTEXT_TEST_DATA "/../fuzz/corpus/gguf_fuzz/";
  absl::StatusOr<GgufFile> all = OpenGguf(dir + "all_types");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->Find("t.u8")->AsInt(), 200);
  EXPECT_EQ(all->Find("t.i8")->AsInt(), -5);
  EXPECT_EQ(all->Find("t.u16")->AsInt(), 60000);
  EXPECT_EQ(all->Find("t.i16")->AsInt(), -300);
  EXPECT_EQ(all->Find("t.u32")->AsInt(), 4000000000);
  EXPECT_EQ(all->Find("t.i32")->AsInt(), -7);
  EXPECT_EQ(all->Find("t.u64")->AsInt(), int64_t{1} << 40);
  EXPECT_EQ(all->Find("t.i64")->AsInt(), -(int64_t{1} << 40));
  EXPECT_EQ(all->Find("t.f32")->f, 0.5);
  EXPECT_EQ(all->Find("t.f64")->f, -2.25);
  EXPECT_EQ(all->Find("t.bool")->i, 1);
  EXPECT_EQ(all->Find("t.str")->str, "héllo");
  EXPECT_EQ(all->Find("a.int16")->Element(0).AsInt(), -7);
  EXPECT_EQ(all->Find("a.uint64")->Element(0).AsInt(), 12);
  EXPECT_EQ(all->Find("a.float64")->Element(0).f, 3.25);
  EXPECT_EQ(all->Find("a.bool")->Element(1).i, 0);
  EXPECT_EQ(all->Find("a.string")->strings[2], "bc");
  ASSERT_EQ(all->Find("a.nested")->items.size(), 2u);
  EXPECT_EQ(all->Find("a.nested")->items[1].Element(0).AsInt(), 3);
  EXPECT_EQ(all->Find("a.nested_str")->items[0].strings[1], "y");
  EXPECT_EQ(OpenGguf(dir + "align64")->alignment, 64u);
  EXPECT_EQ(OpenGguf(dir + "all_types_v2")->version, 2u);
  absl::StatusOr<GgufFile> quants = OpenGguf(dir + "quant_types");
  ASSERT_TRUE(quants.ok()) << quants.status();
  EXPECT_EQ(quants->FindTensor("q6_k")->type, GgmlType::kQ6_K);

  struct Model {
    const char* file;
    Architecture arch;
  };
  for (const Model& m :
       {Model{"qwen2_q8_0", Architecture::kQwen2}, Model{"qwen3_q4_k", Architecture::kQwen3},
        Model{"llama_f16_rope_freqs", Architecture::kLlama}}) {
    absl::StatusOr<Checkpoint> c = OpenCheckpoint(dir + m.file);
    ASSERT_TRUE(c.ok()) << m.file << ": " << c.status();
    EXPECT_EQ(c->config.arch, m.arch);
    EXPECT_EQ(c->config.attention_bias, m.arch == Architecture::kQwen2);
    EXPECT_EQ(c->config.qk_norm, m.arch == Architecture::kQwen3);
    EXPECT_EQ(c->config.tie_word_embeddings, m.arch != Architecture::kLlama);
    EXPECT_EQ(c->config.rope_scaling.freq_factors.size(), m.arch == Architecture::kLlama ? 8u : 0u);
    EXPECT_EQ(c->generation.eos_token_ids, std::vector<int64_t>{7});
    EXPECT_FALSE(c->embedded_tokenizer_json.empty()) << m.file;
  }
}

}  // namespace
}  // namespace specontext
