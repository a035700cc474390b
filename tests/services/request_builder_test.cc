// Request preparation in process: a prompt whose bytes cannot fit the context is refused before it
// is tokenized.
#include "generator/request_builder.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace specontext::generator {
namespace {

using ::testing::HasSubstr;

class RequestBuilderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    RuntimeOptions o;
    o.model_path = std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/stories260K.bin";
    o.tokenizer_path = std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/tok512.bin";
    o.backend = "cpu";
    o.threads = 1;
    auto rt = LoadRuntime(o);
    ASSERT_TRUE(rt.ok()) << rt.status();
    runtime_ = new Runtime(std::move(rt).value());
  }
  static void TearDownTestSuite() { delete runtime_; }

  static v1::GenerateRequest Request() {
    v1::GenerateRequest req;
    req.set_max_new_tokens(4);
    return req;
  }
  static Runtime* runtime_;
};
Runtime* RequestBuilderTest::runtime_ = nullptr;

TEST_F(RequestBuilderTest, PromptTooLongForTheContextIsRefusedBeforeTokenizing) {
  ASSERT_NE(runtime_, nullptr);
  const int64_t per_token = runtime_->tokenizer->MaxBytesPerToken().value_or(0);
  ASSERT_GT(per_token, 0);
  const int64_t context = runtime_->model->config().max_position_embeddings;
  RequestLimits limits;
  limits.max_prompt_bytes = 1 << 20;
  v1::GenerateRequest req = Request();
  req.set_prompt(std::string(static_cast<size_t>(context * per_token), 'a'));
  auto prepared = PrepareRequest(req, *runtime_, limits);
  ASSERT_FALSE(prepared.ok());
  EXPECT_EQ(prepared.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(prepared.status().message(), HasSubstr("a token)"));
  EXPECT_THAT(prepared.status().message(), HasSubstr("context"));

  req = Request();
  for (int i = 0; i < 4; ++i) {
    v1::ChatMessage* m = req.add_messages();
    m->set_role("user");
    m->set_content(std::string(static_cast<size_t>(context * per_token / 4 + 1), 'b'));
  }
  prepared = PrepareRequest(req, *runtime_, limits);
  ASSERT_FALSE(prepared.ok());
  EXPECT_THAT(prepared.status().message(), HasSubstr("a token)"));

  // Just under the bound the prompt is tokenized, and fits or not by its real length.
  req = Request();
  req.set_prompt(std::string(static_cast<size_t>((context - 1) * per_token), ' '));
  prepared = PrepareRequest(req, *runtime_, limits);
  if (!prepared.ok()) {
    EXPECT_THAT(prepared.status().message(), ::testing::Not(HasSubstr("a token)")));
  }
  req.set_prompt("Once upon a time");
  EXPECT_TRUE(PrepareRequest(req, *runtime_, limits).ok());
}

}  // namespace
}  // namespace specontext::generator
