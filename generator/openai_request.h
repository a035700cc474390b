// Parses the bodies of OpenAI's POST /v1/completions and /v1/chat/completions into a plain request
// (no protobuf, so the parser can be fuzzed on its own: tests/fuzz/openai_request_fuzz.cc). Any
// input, however hostile, gives either a request or InvalidArgument naming the field (`param`);
// the values themselves (token ids, budget, message roles, sizes) are checked afterwards by the
// same PrepareRequest() as gRPC requests.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext::generator {

enum class OpenAiEndpoint { kCompletions, kChatCompletions };

struct OpenAiMessage {
  std::string role;
  std::string content;  // a string, or the text parts of a content array joined
};

struct OpenAiRequest {
  OpenAiEndpoint endpoint = OpenAiEndpoint::kCompletions;
  std::string model;                 // empty when the request named none
  std::string prompt;                // completions: the prompt text ...
  std::vector<int32_t> prompt_ids;   // ... or its token ids
  std::vector<OpenAiMessage> messages;  // chat
  std::optional<int64_t> max_tokens;    // max_tokens or max_completion_tokens
  double temperature = 1.0;             // OpenAI's default
  std::optional<double> top_p;
  int64_t top_k = 0;                    // extension: 0 = off
  uint64_t seed = 0;
  bool has_seed = false;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;           // stream_options.include_usage
  std::optional<int64_t> budget;        // extension: sparse budget (tokens per KV head per step)
  bool dense = false;                   // extension: force dense attention
  bool ignore_eos = false;              // extension
  std::string user;                     // accepted and ignored
};

/// InvalidArgument for a body that is not a JSON object, a field of the wrong type, n != 1, or a
/// feature the server does not have (logprobs, echo, best_of > 1, tools, penalties != 0, ...).
/// Unknown fields are ignored, as OpenAI-compatible servers commonly do. The message starts with
/// the field's name; `*param` (when not null) receives it ("" when no single field is at fault).
absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(std::string_view body, OpenAiEndpoint endpoint,
                                                 std::string* param = nullptr);

}  // namespace specontext::generator
