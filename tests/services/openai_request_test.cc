// Units of the OpenAI front end: request parsing, the request it maps to, the status -> HTTP mapping,
// and the UTF-8 hold-back of stream chunks.
#include <gtest/gtest.h>

#include "core/status_http.h"
#include "generator/openai_request.h"
#include "generator/openai_response.h"

namespace specontext::generator {
namespace {

TEST(OpenAiRequest, CompletionFieldsMapToTheGenerateRequest) {
  std::string param;
  auto r = ParseOpenAiRequest(R"({"model": "m", "prompt": "Hi", "max_tokens": 9, "temperature": 0, "top_p": 0.5,
      "seed": 7, "stop": "x", "stream": true, "stream_options": {"include_usage": true}, "budget": 64,
      "dense": true, "top_k": 3, "logprobs": null, "n": 1, "unknown_field": [1]})",
                              OpenAiEndpoint::kCompletions, &param);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  const v1::GenerateRequest g = ToGenerateRequest(*r, 512);
  EXPECT_EQ(g.prompt(), "Hi");
  EXPECT_EQ(g.max_new_tokens(), 9);
  EXPECT_EQ(g.sampling().temperature(), 0.0f);
  EXPECT_FLOAT_EQ(g.sampling().top_p(), 0.5f);
  EXPECT_EQ(g.sampling().seed(), 7u);
  EXPECT_EQ(g.sampling().top_k(), 3);
  ASSERT_EQ(g.stop_size(), 1);
  EXPECT_EQ(g.stop(0), "x");
  EXPECT_EQ(g.sparsity().budget(), 64);
  EXPECT_TRUE(g.sparsity().dense());
}

TEST(OpenAiRequest, DefaultsAndPromptForms) {
  auto r = ParseOpenAiRequest(R"({"prompt": ["Hi"]})", OpenAiEndpoint::kCompletions);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(ToGenerateRequest(*r, 512).max_new_tokens(), kDefaultCompletionMaxTokens);
  EXPECT_EQ(ToGenerateRequest(*r, 512).sampling().temperature(), 1.0f);
  r = ParseOpenAiRequest(R"({"prompt": [[1, 2, 3]]})", OpenAiEndpoint::kCompletions);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(ToGenerateRequest(*r, 512).token_ids_size(), 3);
  r = ParseOpenAiRequest(R"({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
      {"type": "text", "text": "b"}]}], "max_completion_tokens": 5})", OpenAiEndpoint::kChatCompletions);
  ASSERT_TRUE(r.ok()) << r.status();
  const v1::GenerateRequest g = ToGenerateRequest(*r, 512);
  ASSERT_EQ(g.messages_size(), 1);
  EXPECT_EQ(g.messages(0).role(), "system");
  EXPECT_EQ(g.messages(0).content(), "ab");
  EXPECT_EQ(g.max_new_tokens(), 5);
  r = ParseOpenAiRequest(R"({"messages": [{"role": "user", "content": "x"}]})", OpenAiEndpoint::kChatCompletions);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(ToGenerateRequest(*r, 512).max_new_tokens(), 512);  // chat: up to the context
}

TEST(OpenAiRequest, RefusalsNameTheField) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"prompt": "x", "n": 3})", "n"},
      {R"({"prompt": "x", "max_tokens": -1})", "max_tokens"},
      {R"({"prompt": "x", "max_tokens": 1.5})", "max_tokens"},
      {R"({"prompt": "x", "temperature": 3})", "temperature"},
      {R"({"prompt": "x", "temperature": "hot"})", "temperature"},
      {R"({"prompt": "x", "stop": [1]})", "stop"},
      {R"({"prompt": "x", "echo": true})", "echo"},
      {R"({"prompt": "x", "frequency_penalty": 0.5})", "frequency_penalty"},
      {R"({"prompt": "x", "model": 5})", "model"},
      {R"({"prompt": "x", "seed": 18446744073709551615})", "seed"},
      {R"({"prompt": [-1]})", "prompt"},
  };
  for (const auto& [body, field] : cases) {
    std::string param;
    auto r = ParseOpenAiRequest(body, OpenAiEndpoint::kCompletions, &param);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << body;
    EXPECT_EQ(param, field) << body;
  }
  std::string param = "stale";
  auto r = ParseOpenAiRequest("{", OpenAiEndpoint::kCompletions, &param);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(param, "");
}

TEST(StatusHttp, OneMapping) {
  const std::pair<absl::Status, int> cases[] = {
      {absl::InvalidArgumentError("x"), 400}, {absl::FailedPreconditionError("x"), 400},
      {absl::OutOfRangeError("x"), 400},      {absl::UnauthenticatedError("x"), 401},
      {absl::PermissionDeniedError("x"), 403}, {absl::NotFoundError("x"), 404},
      {absl::ResourceExhaustedError("x"), 429}, {absl::UnavailableError("x"), 503},
      {absl::DeadlineExceededError("x"), 504}, {absl::InternalError("x"), 500},
      {absl::UnknownError("x"), 500},          {absl::DataLossError("x"), 500},
  };
  for (const auto& [st, http] : cases) EXPECT_EQ(ToHttpError(st).http_status, http) << st;
  EXPECT_EQ(ToHttpError(absl::OkStatus()).http_status, 200);
  EXPECT_EQ(ToHttpError(absl::ResourceExhaustedError("q")).type, "rate_limit_error");
  EXPECT_LE(ToHttpError(absl::InvalidArgumentError(std::string(1 << 20, 'a'))).message.size(), 1100u);
}

TEST(OpenAiResponse, ChunksNeverEndInsideAUtf8Character) {
  EXPECT_EQ(CompleteUtf8Prefix("abc"), 3u);
  EXPECT_EQ(CompleteUtf8Prefix("a\xC3"), 1u);              // é cut after its lead byte
  EXPECT_EQ(CompleteUtf8Prefix("a\xC3\xA9"), 3u);
  EXPECT_EQ(CompleteUtf8Prefix("a\xE2\x82"), 1u);          // € cut after two of three bytes
  EXPECT_EQ(CompleteUtf8Prefix("\xF0\x9F\x98\x80"), 4u);  // a whole emoji
  EXPECT_EQ(CompleteUtf8Prefix("\xF0\x9F\x98"), 0u);
  EXPECT_EQ(CompleteUtf8Prefix("\x80\x80"), 2u);          // invalid: nothing to wait for
  // Invalid UTF-8 in model text is replaced, never thrown.
  OpenAiChoice c;
  c.text = "a\xFF";
  EXPECT_NE(CompletionJson(OpenAiEndpoint::kCompletions, c).find("\xEF\xBF\xBD"), std::string::npos);
}

}  // namespace
}  // namespace specontext::generator
