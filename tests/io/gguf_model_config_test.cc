// GGUF metadata -> ModelConfig (defaults, RoPE scaling, rope_freqs, tied output, EOS ids), the
// refusals (unknown architecture, missing or mistyped keys, unsupported features), tensor names,
// OpenCheckpoint's errors, and the embedded tokenizer.
#include <filesystem>

#include "core/io/gguf_checkpoint.h"
#include "core/status_macros.h"
#include "core/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/gguf_model_writer.h"
#include "tests/io/test_util.h"
#include "tests/tokenizer/gguf_from_hf.h"

namespace specontext {
namespace {

using testing::GgufWriter;
using ::testing::HasSubstr;

ModelConfig Llama() {
  ModelConfig c;
  c.arch = Architecture::kLlama;
  c.vocab_size = 32;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

// A writer holding `c`'s metadata (and, with `tensors`, random F32 weights).
GgufWriter Writer(const ModelConfig& c, bool tensors = false) {
  GgufWriter w;
  testing::WriteModelMetadata(c, w);
  if (tensors) {
    std::mt19937_64 rng(7);
    testing::WriteModelTensors(c, testing::RandomHfGgufTensors(c, GgmlType::kF32, rng), w);
  }
  return w;
}

absl::StatusOr<ModelConfig> ConfigOf(const GgufWriter& w) {
  const std::string bytes = w.Build();
  ASSIGN_OR_RETURN(GgufFile f,
                   ParseGguf(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  return GgufModelConfig(f);
}

void ExpectError(const GgufWriter& w, absl::StatusCode code, const std::string& needle) {
  absl::StatusOr<ModelConfig> c = ConfigOf(w);
  ASSERT_FALSE(c.ok()) << "wanted: " << needle;
  EXPECT_EQ(c.status().code(), code) << c.status();
  EXPECT_THAT(c.status().message(), HasSubstr(needle));
}

TEST(GgufConfig, KeysAndDefaults) {
  GgufWriter w;
  w.Str("general.architecture", "qwen2")
      .U32("qwen2.context_length", 1024)
      .U32("qwen2.embedding_length", 64);
  w.U32("qwen2.feed_forward_length", 128)
      .U64("qwen2.block_count", 3)
      .I32("qwen2.attention.head_count", 8);
  w.Strings("tokenizer.ggml.tokens", std::vector<std::string>(40, "t"));
  w.U32("tokenizer.ggml.eos_token_id", 7)
      .U32("tokenizer.ggml.eot_token_id", 9)
      .U32("tokenizer.ggml.eom_token_id", 7);
  absl::StatusOr<ModelConfig> c = ConfigOf(w);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Architecture::kQwen2);
  EXPECT_EQ(c->model_type, "qwen2");
  EXPECT_EQ(c->num_hidden_layers, 3);
  EXPECT_EQ(c->num_key_value_heads, 8);  // head_count_kv defaults to head_count
  EXPECT_EQ(c->head_dim, 8);             // key_length defaults to embedding / heads
  EXPECT_EQ(c->vocab_size, 40);          // from the token list (no vocab_size, no embedding)
  EXPECT_EQ(c->rope_theta, 10000.0);     // llama.cpp's default base
  EXPECT_TRUE(c->attention_bias);        // Qwen2 always
  EXPECT_TRUE(c->tie_word_embeddings);   // no output.weight
  EXPECT_EQ(c->bos_token_id, -1);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{7, 9}));
  EXPECT_TRUE(c->rope_scaling.type.empty());
}

TEST(GgufConfig, VocabFromTheEmbedding) {
  ModelConfig m = Llama();
  GgufWriter w;
  testing::WriteModelMetadata(m, w);  // writes llama.vocab_size = 32
  w.Tensor("token_embd.weight", GgmlType::kF32, {64, 48}, std::string(64 * 48 * 4, '\0'));
  EXPECT_EQ(ConfigOf(w)->vocab_size,
            32);  // the declared size wins; ValidateWeights reports a mismatch
  GgufWriter u;
  u.Str("general.architecture", "llama")
      .U32("llama.context_length", 8)
      .U32("llama.embedding_length", 64);
  u.U32("llama.feed_forward_length", 8)
      .U32("llama.block_count", 1)
      .U32("llama.attention.head_count", 4);
  u.Tensor("token_embd.weight", GgmlType::kF32, {64, 48}, std::string(64 * 48 * 4, '\0'));
  EXPECT_EQ(ConfigOf(u)->vocab_size, 48);
  EXPECT_FALSE(ConfigOf(u)->attention_bias);
}

TEST(GgufConfig, RopeScaling) {
  GgufWriter y = Writer(Llama());
  y.Str("llama.rope.scaling.type", "yarn").F32("llama.rope.scaling.factor", 4);
  y.U32("llama.rope.scaling.original_context_length", 64)
      .F32("llama.rope.scaling.yarn_beta_fast", 16);
  y.F32("llama.rope.scaling.yarn_attn_factor", 1.5f);
  absl::StatusOr<ModelConfig> c = ConfigOf(y);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, "yarn");
  EXPECT_EQ(c->rope_scaling.factor, 4);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 64);
  EXPECT_EQ(c->rope_scaling.beta_fast, 16);
  EXPECT_EQ(c->rope_scaling.beta_slow, 1);
  EXPECT_EQ(c->rope_scaling.attention_factor, 1.5);
  GgufWriter l = Writer(Llama());
  l.Str("llama.rope.scaling.type", "linear").F32("llama.rope.scaling.factor", 2);
  EXPECT_EQ(ConfigOf(l)->rope_scaling.type, "linear");
  GgufWriter legacy = Writer(Llama());
  legacy.F32("llama.rope.scale_linear", 8);
  EXPECT_EQ(ConfigOf(legacy)->rope_scaling.factor, 8);
  GgufWriter none = Writer(Llama());
  none.Str("llama.rope.scaling.type", "none");
  EXPECT_TRUE(ConfigOf(none)->rope_scaling.type.empty());
  GgufWriter lr = Writer(Llama());
  lr.Str("llama.rope.scaling.type", "longrope");
  ExpectError(lr, absl::StatusCode::kUnimplemented,
              "RoPE scaling type \"longrope\" is not supported");
  GgufWriter nofactor = Writer(Llama());
  nofactor.Str("llama.rope.scaling.type", "linear");
  ExpectError(nofactor, absl::StatusCode::kInvalidArgument, "llama.rope.scaling.factor");
}

// Llama 3.1's llama3 scaling arrives as the rope_freqs tensor of per-frequency divisors.
TEST(GgufConfig, RopeFreqsTensor) {
  std::vector<float> factors(8);
  for (int j = 0; j < 8; ++j) factors[j] = 1.0f + j;
  GgufWriter w = Writer(Llama());
  w.FloatTensor("rope_freqs.weight", GgmlType::kF32, {8}, factors);
  absl::StatusOr<ModelConfig> c = ConfigOf(w);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.freq_factors, std::vector<double>(factors.begin(), factors.end()));
  GgufWriter bad = Writer(Llama());
  bad.FloatTensor("rope_freqs.weight", GgmlType::kF32, {4}, {1, 1, 1, 1});
  ExpectError(bad, absl::StatusCode::kInvalidArgument,
              "rope_freqs.weight must be F32 of head_dim / 2 = 8");
  GgufWriter zero = Writer(Llama());
  zero.FloatTensor("rope_freqs.weight", GgmlType::kF32, {8}, std::vector<float>(8, 0.0f));
  ExpectError(zero, absl::StatusCode::kInvalidArgument, "factor 0 is 0");
}

TEST(GgufConfig, Refusals) {
  GgufWriter arch;
  arch.Str("general.architecture", "gemma2");
  ExpectError(arch, absl::StatusCode::kUnimplemented,
              "GGUF architecture \"gemma2\" is not supported");
  ExpectError(GgufWriter(), absl::StatusCode::kInvalidArgument, "missing \"general.architecture\"");
  GgufWriter missing;
  missing.Str("general.architecture", "qwen3").U32("qwen3.embedding_length", 64);
  ExpectError(missing, absl::StatusCode::kInvalidArgument, "missing \"qwen3.feed_forward_length\"");
  GgufWriter str;
  str.Str("general.architecture", "llama").Str("llama.embedding_length", "64");
  ExpectError(str, absl::StatusCode::kInvalidArgument,
              "\"llama.embedding_length\" must be an integer, not string");
  ModelConfig m = Llama();
  GgufWriter rot;
  rot.Str("general.architecture", "llama")
      .U32("llama.context_length", 8)
      .U32("llama.embedding_length", 64);
  rot.U32("llama.feed_forward_length", 8)
      .U32("llama.block_count", 1)
      .U32("llama.attention.head_count", 4);
  rot.U32("llama.rope.dimension_count", 8);
  ExpectError(rot, absl::StatusCode::kUnimplemented, "partial rotary embeddings are not supported");
  GgufWriter perlayer;
  perlayer.Str("general.architecture", "llama")
      .U32("llama.context_length", 8)
      .U32("llama.embedding_length", 64);
  perlayer.U32("llama.feed_forward_length", 8)
      .U32("llama.block_count", 2)
      .U32("llama.attention.head_count", 4);
  perlayer.I32s("llama.attention.head_count_kv", {2, 4});
  ExpectError(perlayer, absl::StatusCode::kUnimplemented,
              "\"llama.attention.head_count_kv\" differs between layers");
  GgufWriter same;
  same.Str("general.architecture", "llama")
      .U32("llama.context_length", 8)
      .U32("llama.embedding_length", 64);
  same.U32("llama.feed_forward_length", 8)
      .U32("llama.block_count", 2)
      .U32("llama.attention.head_count", 4);
  same.I32s("llama.attention.head_count_kv", {2, 2});
  same.Strings("tokenizer.ggml.tokens", {"a"});
  EXPECT_EQ(ConfigOf(same)->num_key_value_heads, 2);
  GgufWriter gqa = same;
  gqa.U32("llama.attention.key_length", 7);
  ExpectError(gqa, absl::StatusCode::kInvalidArgument, "must be even");
  m.vocab_size = 2;
  GgufWriter toks = Writer(m);
  toks.Strings("tokenizer.ggml.tokens", {"a", "b", "c"});
  ExpectError(toks, absl::StatusCode::kInvalidArgument,
              "token list has 3 tokens, more than the model's vocabulary of 2");
}

TEST(GgufConfig, TensorNames) {
  EXPECT_EQ(HfTensorName("token_embd.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(HfTensorName("output.weight"), "lm_head.weight");
  EXPECT_EQ(HfTensorName("output_norm.weight"), "model.norm.weight");
  EXPECT_EQ(HfTensorName("blk.12.attn_q.weight"), "model.layers.12.self_attn.q_proj.weight");
  EXPECT_EQ(HfTensorName("blk.0.attn_output.weight"), "model.layers.0.self_attn.o_proj.weight");
  EXPECT_EQ(HfTensorName("blk.3.ffn_norm.weight"),
            "model.layers.3.post_attention_layernorm.weight");
  EXPECT_EQ(HfTensorName("blk.3.attn_norm.weight"), "model.layers.3.input_layernorm.weight");
  EXPECT_EQ(HfTensorName("blk.1.attn_k_norm.weight"), "model.layers.1.self_attn.k_norm.weight");
  EXPECT_EQ(HfTensorName("blk.1.attn_v.bias"), "model.layers.1.self_attn.v_proj.bias");
  EXPECT_EQ(HfTensorName("blk.2.ffn_gate.weight"), "model.layers.2.mlp.gate_proj.weight");
  for (const char* unmapped :
       {"rope_freqs.weight", "blk.01.attn_q.weight", "blk..attn_q.weight", "blk.-1.attn_q.weight",
        "blk.1.attn_qkv.weight", "blk.1", "blk.x.ffn_up.weight", "output"}) {
    EXPECT_EQ(HfTensorName(unmapped), "") << unmapped;
  }
}

TEST(GgufCheckpoint, ErrorsNameThePathAndTensor) {
  testing::ScratchDir dir;
  GgufWriter w = Writer(Llama());  // metadata only: every tensor is missing
  testing::WriteFile(dir.Path("m.gguf"), w.Build());
  absl::StatusOr<Checkpoint> c = OpenCheckpoint(dir.Path("m.gguf"));
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(),
              HasSubstr(dir.Path("m.gguf") +
                        ": checkpoint is missing tensor \"model.embed_tokens.weight\""));
  testing::WriteFile(dir.Path("fake.gguf"), "not gguf at all");
  EXPECT_THAT(OpenCheckpoint(dir.Path("fake.gguf")).status().message(),
              HasSubstr(dir.Path("fake.gguf") + ": gguf: not a GGUF file"));
  GgufWriter g;
  g.Str("general.architecture", "phi3");
  testing::WriteFile(dir.Path("phi.bin"), g.Build());  // dispatched on the magic, not the extension
  EXPECT_THAT(OpenCheckpoint(dir.Path("phi.bin")).status().message(),
              HasSubstr(dir.Path("phi.bin") + ": GGUF architecture \"phi3\" is not supported"));
  // A tensor in a type the engine cannot dequantize is refused naming the type.
  ModelConfig m = Llama();
  m.hidden_size = 256;
  m.head_dim = 64;
  GgufWriter iq = Writer(m);
  iq.Tensor("token_embd.weight", GgmlType::kIQ2_XXS, {256, 32}, std::string(32 * 66, '\0'));
  testing::WriteFile(dir.Path("iq.gguf"), iq.Build());
  EXPECT_THAT(OpenCheckpoint(dir.Path("iq.gguf")).status().message(),
              HasSubstr("tensor \"model.embed_tokens.weight\" (GGUF \"token_embd.weight\") has "
                        "ggml type IQ2_XXS"));
}

TEST(GgufCheckpoint, ExtraTensorsAreIgnored) {
  testing::ScratchDir dir;
  GgufWriter w = Writer(Llama(), /*tensors=*/true);
  w.FloatTensor("blk.0.attn_rot_embd", GgmlType::kF32, {4}, {1, 2, 3, 4});
  w.FloatTensor("blk.7.attn_q.weight", GgmlType::kF32, {4}, {1, 2, 3, 4});  // past block_count
  w.FloatTensor("rope_freqs.weight", GgmlType::kF32, {8}, std::vector<float>(8, 1.0f));
  testing::WriteFile(dir.Path("m.gguf"), w.Build());
  absl::StatusOr<Checkpoint> c = OpenCheckpoint(dir.Path("m.gguf"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->weights->Names().size(), ExpectedTensors(c->config).size());
  EXPECT_FALSE(c->weights->Has("rope_freqs.weight"));
  EXPECT_EQ(c->config.rope_scaling.freq_factors.size(), 8u);
  EXPECT_TRUE(c->embedded_tokenizer_json.empty());  // no tokenizer.ggml.tokens
}

// The tokenizer.ggml.* keys become tokenizer.json texts that tokenize like the HF tokenizer they
// came from.
TEST(GgufCheckpoint, EmbeddedTokenizer) {
  const std::string tok_path = SPECONTEXT_TEST_DATA "/tiny/tiny-llama/tokenizer.json";
  const GgufVocab v = testing::GgufVocabFromHf(testing::ReadFile(tok_path), "{}", "gpt-2");
  ModelConfig m = Llama();
  m.vocab_size = static_cast<int64_t>(v.tokens.size());
  GgufWriter w = Writer(m, /*tensors=*/true);
  w.Str("tokenizer.ggml.model", v.model)
      .Str("tokenizer.ggml.pre", v.pre)
      .Strings("tokenizer.ggml.tokens", v.tokens);
  w.I32s("tokenizer.ggml.token_type", v.token_types).Strings("tokenizer.ggml.merges", v.merges);
  w.Str("tokenizer.chat_template", "{{ messages }}");
  testing::ScratchDir dir;
  testing::WriteFile(dir.Path("m.gguf"), w.Build());
  absl::StatusOr<Checkpoint> c = OpenCheckpoint(dir.Path("m.gguf"));
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_FALSE(c->embedded_tokenizer_json.empty());
  EXPECT_THAT(c->embedded_tokenizer_config_json, HasSubstr("{{ messages }}"));
  auto embedded = ParseHfTokenizer(c->embedded_tokenizer_json, c->embedded_tokenizer_config_json);
  ASSERT_TRUE(embedded.ok()) << embedded.status();
  auto hf = LoadHfTokenizer(tok_path);
  ASSERT_TRUE(hf.ok()) << hf.status();
  for (const char* text : {"hello world", "Once upon a time, 123 cats!", "  spaces\nand lines"}) {
    EXPECT_EQ((*embedded)->Encode(text, false).value(), (*hf)->Encode(text, false).value()) << text;
  }
  // An unconvertible vocabulary leaves the model loadable (with a warning) and no embedded
  // tokenizer.
  GgufWriter odd = Writer(m, /*tensors=*/true);
  odd.Str("tokenizer.ggml.model", "bert").Strings("tokenizer.ggml.tokens", v.tokens);
  testing::WriteFile(dir.Path("odd.gguf"), odd.Build());
  absl::StatusOr<Checkpoint> o = OpenCheckpoint(dir.Path("odd.gguf"));
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->embedded_tokenizer_json.empty());
}

}  // namespace
}  // namespace specontext
