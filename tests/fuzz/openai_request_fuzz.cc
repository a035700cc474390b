// Fuzzes the parsing of OpenAI-compatible request bodies (generator/openai_request.cc), as the
// generator's HTTP front end receives them from any client. Invariants: no crash, no exception, no
// leak on any input; an accepted request satisfies what the parser promises (n = 1 implied, a
// completions prompt or a non-empty message list, max_tokens >= 1, temperature in [0, 2], top_p in
// (0, 1]); a rejected one names a field that appears in the body, the missing prompt / messages, or none.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "generator/openai_request.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace specontext::generator;
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  for (OpenAiEndpoint endpoint : {OpenAiEndpoint::kCompletions, OpenAiEndpoint::kChatCompletions}) {
    std::string param;
    absl::StatusOr<OpenAiRequest> r = ParseOpenAiRequest(body, endpoint, &param);
    if (!r.ok()) {
      if (r.status().code() != absl::StatusCode::kInvalidArgument) std::abort();
      // The field named is in the body, or is the one required field that is missing.
      const bool required = param == "prompt" || param == "messages";
      if (!param.empty() && !required && body.find(param) == std::string_view::npos) std::abort();
      continue;
    }
    if (r->endpoint != endpoint) std::abort();
    if (endpoint == OpenAiEndpoint::kChatCompletions && r->messages.empty()) std::abort();
    if (r->max_tokens.has_value() && *r->max_tokens < 1) std::abort();
    if (!(r->temperature >= 0 && r->temperature <= 2)) std::abort();
    if (r->top_p.has_value() && !(*r->top_p > 0 && *r->top_p <= 1)) std::abort();
    if (r->budget.has_value() && *r->budget < 1) std::abort();
  }
  return 0;
}
