// The OpenAI shapes of what the generation service produces: the GenerateRequest an OpenAI request
// stands for (validated afterwards by the same PrepareRequest() as gRPC requests), and the JSON of
// completions, chat completions, their stream chunks, /v1/models and errors.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "core/status_http.h"
#include "generator/openai_request.h"
#include "proto/specontext.pb.h"

namespace specontext::generator {

/// max_tokens when a completions request sets none (OpenAI's default); a chat request without one
/// may generate up to `context_tokens` (the engine stops at the context).
constexpr int64_t kDefaultCompletionMaxTokens = 16;

/// The gRPC request an OpenAI request stands for (chat messages go to `messages`, rendered with the
/// chat template by the same code as gRPC ones).
v1::GenerateRequest ToGenerateRequest(const OpenAiRequest& req, int64_t context_tokens);

/// "stop" for a stop token or string, "length" for max_tokens or the context, else "stop".
const char* OpenAiFinishReason(v1::FinishReason reason);

/// What one finished (or finishing) choice holds.
struct OpenAiChoice {
  std::string id;     // "cmpl-…" or "chatcmpl-…"
  int64_t created = 0;  // Unix seconds
  std::string model;
  std::string text;
  std::string finish_reason;  // empty while streaming
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

/// The whole response of a non-streaming request (usage included).
std::string CompletionJson(OpenAiEndpoint endpoint, const OpenAiChoice& choice);
/// One stream chunk: `text` as the choice's text (chat: delta.content, with delta.role on the first
/// chunk), finish_reason set on the last. `usage_only`: the chunk with empty choices and the usage
/// (stream_options.include_usage).
std::string ChunkJson(OpenAiEndpoint endpoint, const OpenAiChoice& choice, bool first, bool usage_only);
/// GET /v1/models.
std::string ModelsJson(const std::string& model, int64_t created);
/// {"error": {"message", "type", "param", "code"}}; empty param / code are null.
std::string ErrorJson(const HttpError& error, const std::string& param, const std::string& code);

/// The length of the longest prefix of `text` that does not end inside a UTF-8 sequence: a stream
/// chunk holds back an incomplete character (a byte token) until the rest of it arrives.
size_t CompleteUtf8Prefix(std::string_view text);

}  // namespace specontext::generator
