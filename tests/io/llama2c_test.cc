// llama2.c checkpoints: the real stories260K file, synthetic unshared-classifier files, corrupt files.
#include "core/io/llama2c.h"

#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

using ::testing::HasSubstr;
const std::string kStories = std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/stories260K.bin";

float FloatAt(const std::string& bytes, uint64_t float_index) {
  float f;
  std::memcpy(&f, bytes.data() + 28 + float_index * 4, 4);
  return f;
}

TEST(Llama2cTest, Stories260KShapesAndConfig) {
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(kStories);
  ASSERT_TRUE(ck.ok()) << ck.status();
  const ModelConfig& c = ck->config;
  EXPECT_EQ(c.arch, Architecture::kLlama);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_hidden_layers, 5);
  EXPECT_EQ(c.num_attention_heads, 8);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.rope_interleaved);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>({2}));
  EXPECT_FALSE(ck->weights->Has("lm_head.weight"));
  EXPECT_EQ(ck->tokenizer_path, std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/tok512.bin");
  EXPECT_EQ(ck->weights->Names().size(), 2u + 9u * 5u);

  const WeightSource& w = *ck->weights;
  EXPECT_EQ(w.Get("model.embed_tokens.weight")->shape(), Shape({512, 64}));
  EXPECT_EQ(w.Get("model.layers.4.self_attn.k_proj.weight")->shape(), Shape({32, 64}));
  EXPECT_EQ(w.Get("model.layers.0.mlp.gate_proj.weight")->shape(), Shape({172, 64}));
  EXPECT_EQ(w.Get("model.layers.0.mlp.down_proj.weight")->shape(), Shape({64, 172}));
  EXPECT_EQ(w.Get("model.norm.weight")->dtype(), DType::kF32);

  // Values come from the offsets the format defines, computed here independently.
  const std::string bytes = testing::ReadFile(kStories);
  const uint64_t d = 64, hid = 172, L = 5, V = 512, kv = 32;
  const uint64_t rms_att = V * d, wq = rms_att + L * d, wk = wq + L * d * d, wv = wk + L * kv * d;
  const uint64_t wo = wv + L * kv * d, rms_ffn = wo + L * d * d, w1 = rms_ffn + L * d, w2 = w1 + L * hid * d;
  const uint64_t w3 = w2 + L * d * hid, rms_final = w3 + L * hid * d;
  struct Probe {
    const char* name;
    uint64_t base;
    int64_t elem;
  };
  for (const Probe& p : {Probe{"model.embed_tokens.weight", 0, 511 * 64 + 7},
                         Probe{"model.layers.3.input_layernorm.weight", rms_att + 3 * d, 5},
                         Probe{"model.layers.2.self_attn.q_proj.weight", wq + 2 * d * d, 4000},
                         Probe{"model.layers.1.self_attn.v_proj.weight", wv + 1 * kv * d, 2047},
                         Probe{"model.layers.4.self_attn.o_proj.weight", wo + 4 * d * d, 17},
                         Probe{"model.layers.0.post_attention_layernorm.weight", rms_ffn, 63},
                         Probe{"model.layers.1.mlp.gate_proj.weight", w1 + hid * d, 9999},
                         Probe{"model.layers.2.mlp.down_proj.weight", w2 + 2 * d * hid, 171},
                         Probe{"model.layers.4.mlp.up_proj.weight", w3 + 4 * hid * d, 11007},
                         Probe{"model.norm.weight", rms_final, 0}}) {
    absl::StatusOr<Tensor> t = w.Get(p.name);
    ASSERT_TRUE(t.ok()) << p.name;
    EXPECT_EQ(t->as<float>()[p.elem], FloatAt(bytes, p.base + p.elem)) << p.name;
  }
  // Norm weights of a trained model are O(1) and not all equal: a crude check the offsets are real.
  const Tensor norm = *w.Get("model.norm.weight");
  EXPECT_NE(norm.as<float>()[0], norm.as<float>()[1]);
}

TEST(Llama2cTest, TruncatedOrPaddedCopyFails) {
  testing::ScratchDir dir;
  const std::string bytes = testing::ReadFile(kStories);
  for (size_t size : {bytes.size() - 4, bytes.size() / 2, size_t{40}, size_t{10}}) {
    testing::WriteFile(dir.Path("t.bin"), bytes.substr(0, size));
    absl::StatusOr<Checkpoint> ck = OpenCheckpoint(dir.Path("t.bin"));
    ASSERT_FALSE(ck.ok()) << size;
    EXPECT_EQ(ck.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ck.status().message(), HasSubstr(dir.Path("t.bin")));
  }
  testing::WriteFile(dir.Path("t.bin"), bytes + "xxxx");
  EXPECT_THAT(OpenCheckpoint(dir.Path("t.bin")).status().message(), HasSubstr("implies exactly"));
}

std::string HeaderBytes(std::initializer_list<int32_t> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), std::data(v), s.size());
  return s;
}

TEST(Llama2cTest, BadHeaders) {
  testing::ScratchDir dir;
  struct Bad {
    std::initializer_list<int32_t> header;
    const char* expect;
  };
  for (const Bad& b : {Bad{{64, 172, 5, 8, 3, 512, 512}, "not a multiple of n_kv_heads"},
                       Bad{{64, 172, 0, 8, 4, 512, 512}, "must be positive"},
                       Bad{{64, -1, 5, 8, 4, 512, 512}, "must be positive"},
                       Bad{{64, 172, 5, 8, 4, 0, 512}, "must be positive"},
                       Bad{{60, 172, 5, 8, 4, 512, 512}, "even head size"},
                       Bad{{1 << 30, 172, 5, 8, 4, 512, 512}, "implausibly large"}}) {
    testing::WriteFile(dir.Path("h.bin"), HeaderBytes(b.header) + std::string(4096, '\0'));
    EXPECT_THAT(OpenCheckpoint(dir.Path("h.bin")).status().message(), HasSubstr(b.expect));
  }
}

TEST(Llama2cTest, UnsharedClassifierBecomesLmHead) {
  // A synthetic file with negative vocab: random floats, exact size, lm_head after the RoPE tables.
  testing::ScratchDir dir;
  const int32_t d = 16, hid = 24, L = 2, H = 4, KV = 2, V = 37, S = 9;
  Llama2cHeader h{d, hid, L, H, KV, -V, S};
  absl::StatusOr<uint64_t> size = Llama2cExpectedFileSize(h);
  ASSERT_TRUE(size.ok());
  const uint64_t floats = (*size - 28) / 4;
  std::vector<float> data(floats);
  std::mt19937 rng(testing::FreshSeed());
  std::normal_distribution<float> nd;
  for (float& f : data) f = nd(rng);
  std::string bytes = HeaderBytes({d, hid, L, H, KV, -V, S});
  bytes.append(reinterpret_cast<const char*>(data.data()), data.size() * 4);
  testing::WriteFile(dir.Path("u.bin"), bytes);
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(dir.Path("u.bin"));
  ASSERT_TRUE(ck.ok()) << ck.status();
  EXPECT_FALSE(ck->config.tie_word_embeddings);
  EXPECT_EQ(ck->config.vocab_size, V);
  absl::StatusOr<Tensor> lm = ck->weights->Get("lm_head.weight");
  ASSERT_TRUE(lm.ok());
  EXPECT_EQ(lm->shape(), Shape({V, d}));
  // lm_head is the last V*d floats of the file.
  EXPECT_EQ(lm->as<float>()[0], data[floats - V * d]);
  EXPECT_EQ(lm->as<float>()[V * d - 1], data[floats - 1]);
}

}  // namespace
}  // namespace specontext
