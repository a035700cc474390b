// config.json / generation_config.json parsing: each family, defaults, every rejected case.
#include "core/io/model_config.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

// The published Llama-3.1-8B config.json (abridged to the fields we read, plus some we ignore).
json Llama31() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": false,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 128256})");
}

json Qwen2() {
  return json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": true, "vocab_size": 151936,
    "bos_token_id": 151643, "eos_token_id": [151645, 151643], "rope_scaling": null, "torch_dtype": "bfloat16"})");
}

json Qwen3() {
  return json::parse(R"({
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "head_dim": 128,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "num_attention_heads": 16,
    "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "tie_word_embeddings": true, "vocab_size": 151936, "attention_bias": false})");
}

absl::StatusOr<ModelConfig> Parse(const json& j) { return ParseModelConfig(j.dump()); }

TEST(ModelConfigTest, Llama31) {
  absl::StatusOr<ModelConfig> c = Parse(Llama31());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Architecture::kLlama);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->q_dim(), 4096);
  EXPECT_EQ(c->kv_dim(), 1024);
  EXPECT_EQ(c->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>({128001}));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
}

TEST(ModelConfigTest, LlamaAttentionBiasAndDefaults) {
  json j = Llama31();
  j["attention_bias"] = true;
  j.erase("num_key_value_heads");
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j.erase("architectures");  // model_type alone is enough
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->rope_scaling.type, "");
}

TEST(ModelConfigTest, Qwen2AlwaysHasBias) {
  absl::StatusOr<ModelConfig> c = Parse(Qwen2());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Architecture::kQwen2);
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>({151645, 151643}));
}

TEST(ModelConfigTest, Qwen3ExplicitHeadDimAndQkNorm) {
  absl::StatusOr<ModelConfig> c = Parse(Qwen3());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Architecture::kQwen3);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->q_dim(), 2048);  // != hidden_size
  json j = Qwen3();
  j["attention_bias"] = true;
  EXPECT_TRUE(Parse(j)->attention_bias);
}

TEST(ModelConfigTest, TransformersV5RopeParameters) {
  json j = Llama31();
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 32.0},
                          {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                          {"original_max_position_embeddings", 8192}};
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 32.0);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
}

TEST(ModelConfigTest, RopeScalingTypes) {
  for (const char* type : {"linear", "yarn", "default"}) {
    json j = Llama31();
    j["rope_scaling"] = {{"type", type}, {"factor", 4.0}, {"original_max_position_embeddings", 4096}};
    absl::StatusOr<ModelConfig> c = Parse(j);
    ASSERT_TRUE(c.ok()) << type << ": " << c.status();
    EXPECT_EQ(c->rope_scaling.type, std::string(type) == "default" ? "" : type);
  }
}

struct BadCase {
  const char* label;
  std::function<void(json&)> edit;
  const char* expect;
};

class BadConfigTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadConfigTest, Rejected) {
  json j = Llama31();
  GetParam().edit(j);
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_FALSE(c.ok()) << GetParam().label;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(GetParam().expect));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadConfigTest,
    ::testing::Values(
        BadCase{"unsupported arch", [](json& j) { j["architectures"] = {"MistralForCausalLM"}; },
                "unsupported architecture \"MistralForCausalLM\" (supported:"},
        BadCase{"no arch", [](json& j) { j.erase("architectures"); j.erase("model_type"); }, "unsupported architecture"},
        BadCase{"missing hidden", [](json& j) { j.erase("hidden_size"); }, "missing required \"hidden_size\""},
        BadCase{"missing vocab", [](json& j) { j.erase("vocab_size"); }, "missing required \"vocab_size\""},
        BadCase{"missing layers", [](json& j) { j.erase("num_hidden_layers"); }, "num_hidden_layers"},
        BadCase{"zero heads", [](json& j) { j["num_attention_heads"] = 0; }, "\"num_attention_heads\" must be > 0"},
        BadCase{"negative inter", [](json& j) { j["intermediate_size"] = -5; }, "\"intermediate_size\" must be > 0"},
        BadCase{"float int", [](json& j) { j["hidden_size"] = 4096.5; }, "\"hidden_size\" must be an integer"},
        BadCase{"string int", [](json& j) { j["vocab_size"] = "128256"; }, "\"vocab_size\" must be an integer"},
        BadCase{"kv not divisor", [](json& j) { j["num_key_value_heads"] = 5; }, "not a multiple of num_key_value_heads"},
        BadCase{"kv zero", [](json& j) { j["num_key_value_heads"] = 0; }, "num_key_value_heads"},
        BadCase{"odd head_dim", [](json& j) { j["head_dim"] = 127; }, "head_dim must be even"},
        BadCase{"hidden not divisible", [](json& j) { j["hidden_size"] = 4097; }, "not a multiple of num_attention_heads"},
        BadCase{"eps zero", [](json& j) { j["rms_norm_eps"] = 0; }, "rms_norm_eps"},
        BadCase{"theta negative", [](json& j) { j["rope_theta"] = -1; }, "rope_theta"},
        BadCase{"eos string", [](json& j) { j["eos_token_id"] = "2"; }, "eos_token_id"},
        BadCase{"eos list bad", [](json& j) { j["eos_token_id"] = {1, "x"}; }, "eos_token_id"},
        BadCase{"rope unknown", [](json& j) { j["rope_scaling"]["rope_type"] = "dynamic"; },
                "unsupported rope_scaling type \"dynamic\""},
        BadCase{"rope no type", [](json& j) { j["rope_scaling"] = {{"factor", 2.0}}; }, "no \"rope_type\""},
        BadCase{"rope not object", [](json& j) { j["rope_scaling"] = 3; }, "must be null or an object"},
        BadCase{"llama3 no orig", [](json& j) { j["rope_scaling"].erase("original_max_position_embeddings"); },
                "original_max_position_embeddings"},
        BadCase{"tie not bool", [](json& j) { j["tie_word_embeddings"] = "yes"; }, "tie_word_embeddings"},
        BadCase{"huge vocab", [](json& j) { j["vocab_size"] = int64_t{1} << 40; }, "implausibly large"}),
    [](const ::testing::TestParamInfo<BadCase>& info) {
      std::string s = info.param.label;
      for (char& ch : s) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
      return s;
    });

TEST(ModelConfigTest, NotJsonOrNotObject) {
  EXPECT_THAT(ParseModelConfig("{").status().message(), HasSubstr("not valid JSON"));
  EXPECT_THAT(ParseModelConfig("[1]").status().message(), HasSubstr("not a JSON object"));
  EXPECT_THAT(ParseModelConfig("").status().message(), HasSubstr("not valid JSON"));
}

TEST(ModelConfigTest, JsonRoundTripOfEachFamily) {
  for (const json& j : {Llama31(), Qwen2(), Qwen3()}) {
    absl::StatusOr<ModelConfig> a = Parse(j);
    ASSERT_TRUE(a.ok());
    const std::string text = ModelConfigToJson(*a);
    absl::StatusOr<ModelConfig> b = ParseModelConfig(text);
    ASSERT_TRUE(b.ok()) << b.status() << "\n" << text;
    EXPECT_EQ(b->arch, a->arch);
    EXPECT_EQ(b->hidden_size, a->hidden_size);
    EXPECT_EQ(b->head_dim, a->head_dim);
    EXPECT_EQ(b->num_key_value_heads, a->num_key_value_heads);
    EXPECT_EQ(b->attention_bias, a->attention_bias);
    EXPECT_EQ(b->qk_norm, a->qk_norm);
    EXPECT_EQ(b->tie_word_embeddings, a->tie_word_embeddings);
    EXPECT_EQ(b->rope_scaling.type, a->rope_scaling.type);
    EXPECT_DOUBLE_EQ(b->rope_scaling.factor, a->rope_scaling.factor);
    EXPECT_DOUBLE_EQ(b->rope_theta, a->rope_theta);
    EXPECT_DOUBLE_EQ(b->rms_norm_eps, a->rms_norm_eps);
    EXPECT_EQ(b->eos_token_ids, a->eos_token_ids);
    const json out = json::parse(text);
    EXPECT_EQ(out["architectures"][0], std::string(ArchitectureName(a->arch)));
    EXPECT_TRUE(out.contains("torch_dtype"));
  }
}

// Per-frequency RoPE factors (from a GGUF file's rope_freqs) survive config.json; bad lists are refused.
TEST(ModelConfigTest, RopeFreqFactorsRoundTrip) {
  absl::StatusOr<ModelConfig> a = Parse(Qwen3());
  ASSERT_TRUE(a.ok());
  for (int64_t j = 0; j < a->head_dim / 2; ++j) a->rope_scaling.freq_factors.push_back(1.0 + 0.25 * j);
  absl::StatusOr<ModelConfig> b = ParseModelConfig(ModelConfigToJson(*a));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->rope_scaling.freq_factors, a->rope_scaling.freq_factors);
  json j = Qwen3();
  j["specontext_rope_freq_factors"] = {1.0, 2.0};
  EXPECT_THAT(Parse(j).status().message(), HasSubstr("specontext_rope_freq_factors"));
  j["specontext_rope_freq_factors"] = std::vector<double>(a->head_dim / 2, 0.0);
  EXPECT_THAT(Parse(j).status().message(), HasSubstr("non-positive"));
}

TEST(ModelConfigTest, LoadFromFileWithSizeCapAndPathInErrors) {
  testing::ScratchDir dir;
  testing::WriteFile(dir.Path("config.json"), Qwen3().dump());
  EXPECT_TRUE(LoadModelConfig(dir.Path("config.json")).ok());
  EXPECT_EQ(LoadModelConfig(dir.Path("absent.json")).status().code(), absl::StatusCode::kNotFound);
  testing::WriteFile(dir.Path("big.json"), std::string(17u << 20, ' '));
  EXPECT_THAT(LoadModelConfig(dir.Path("big.json")).status().message(), HasSubstr("limit"));
  testing::WriteFile(dir.Path("bad.json"), R"({"model_type": "gpt2"})");
  absl::Status s = LoadModelConfig(dir.Path("bad.json")).status();
  EXPECT_THAT(s.message(), HasSubstr(dir.Path("bad.json")));
  EXPECT_THAT(s.message(), HasSubstr("gpt2"));
}

TEST(GenerationConfigTest, ParsesAndValidates) {
  absl::StatusOr<GenerationDefaults> g = ParseGenerationConfig(
      R"({"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128008, 128009],
          "temperature": 0.6, "top_p": 0.9, "top_k": 20, "transformers_version": "4.45.0"})");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_TRUE(g->do_sample);
  EXPECT_DOUBLE_EQ(g->temperature, 0.6);
  EXPECT_DOUBLE_EQ(g->top_p, 0.9);
  EXPECT_EQ(g->top_k, 20);
  EXPECT_EQ(g->bos_token_id, 128000);
  EXPECT_EQ(g->eos_token_ids, std::vector<int64_t>({128001, 128008, 128009}));

  absl::StatusOr<GenerationDefaults> d = ParseGenerationConfig("{}");
  ASSERT_TRUE(d.ok());
  EXPECT_FALSE(d->do_sample);
  EXPECT_DOUBLE_EQ(d->temperature, 1.0);
  EXPECT_TRUE(d->eos_token_ids.empty());

  EXPECT_THAT(ParseGenerationConfig(R"({"top_p": 1.5})").status().message(), HasSubstr("top_p"));
  EXPECT_THAT(ParseGenerationConfig(R"({"temperature": "hot"})").status().message(), HasSubstr("temperature"));
  EXPECT_THAT(ParseGenerationConfig(R"({"do_sample": 1})").status().message(), HasSubstr("do_sample"));
  EXPECT_THAT(ParseGenerationConfig(R"({"eos_token_id": -3})").status().message(), HasSubstr("negative"));
  EXPECT_THAT(ParseGenerationConfig("nope").status().message(), HasSubstr("generation_config.json"));
  EXPECT_DOUBLE_EQ(ParseGenerationConfig(R"({"repetition_penalty": 1.1})")->repetition_penalty, 1.1);
  EXPECT_DOUBLE_EQ(ParseGenerationConfig("{}")->repetition_penalty, 1.0);
  EXPECT_THAT(ParseGenerationConfig(R"({"repetition_penalty": 0})").status().message(),
              HasSubstr("repetition_penalty"));
}

// HF gives o_proj the attention_bias in Llama and Qwen3, never in Qwen2; mlp_bias is Llama's.
TEST(ModelConfigTest, OutputProjectionAndMlpBiases) {
  json j = Llama31();
  EXPECT_FALSE(Parse(j)->o_proj_bias);
  j["attention_bias"] = true;
  j["mlp_bias"] = true;
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->o_proj_bias);
  EXPECT_TRUE(c->mlp_bias);
  EXPECT_FALSE(Parse(Qwen2())->o_proj_bias);
  json q3 = Qwen3();
  EXPECT_FALSE(Parse(q3)->o_proj_bias);
  q3["attention_bias"] = true;
  q3["mlp_bias"] = true;  // not a Qwen3 field: ignored as transformers does
  EXPECT_TRUE(Parse(q3)->o_proj_bias);
  EXPECT_FALSE(Parse(q3)->mlp_bias);
  ModelConfig round = *ParseModelConfig(ModelConfigToJson(*c));
  EXPECT_TRUE(round.o_proj_bias);
  EXPECT_TRUE(round.mlp_bias);
}

TEST(ModelConfigTest, RefusesWhatWouldChangeTheOutput) {
  json quant = Llama31();
  quant["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4}};
  EXPECT_THAT(Parse(quant).status().message(), HasSubstr("quantized (quantization_config.quant_method \"gptq\")"));
  json act = Llama31();
  act["hidden_act"] = "gelu";
  EXPECT_THAT(Parse(act).status().message(), HasSubstr("unsupported \"hidden_act\" \"gelu\""));
  json sliding = Qwen2();
  sliding["use_sliding_window"] = true;
  sliding["sliding_window"] = 4096;
  sliding["max_window_layers"] = 21;
  EXPECT_THAT(Parse(sliding).status().message(), HasSubstr("use_sliding_window"));
  sliding["max_window_layers"] = 24;  // no layer at or past it: every layer is full attention
  EXPECT_TRUE(Parse(sliding).ok());
  sliding["use_sliding_window"] = false;
  sliding["max_window_layers"] = 0;
  EXPECT_TRUE(Parse(sliding).ok());
  json types = Qwen3();
  types["layer_types"] = json::array();
  for (int i = 0; i < 28; ++i) types["layer_types"].push_back(i == 5 ? "sliding_attention" : "full_attention");
  EXPECT_THAT(Parse(types).status().message(), HasSubstr("sliding_attention"));
}

}  // namespace
}  // namespace specontext
