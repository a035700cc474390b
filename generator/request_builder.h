// Turns a specontext.v1.GenerateRequest into an engine GenerationRequest, rejecting bad input with
// INVALID_ARGUMENT and a message naming the field (the engine re-checks what it owns: context length).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "core/model/engine.h"
#include "core/runtime/runtime.h"
#include "core/tokenizer/chat_template.h"
#include "proto/specontext.pb.h"

namespace specontext::generator {

/// Server-side limits on one request.
struct RequestLimits {
  int64_t max_new_tokens = int64_t{1} << 20;  // larger values are rejected, smaller ones clamped to the context
  int64_t max_prompt_bytes = 1 << 20;         // prompt text (or all message contents together)
  int64_t max_stop_strings = 16;
  int64_t max_stop_bytes = 256;               // per stop string
  int64_t max_request_id_bytes = 256;         // --max-request-id-bytes
  int64_t default_budget = 0;                 // --budget; 0 = dense
  ChatTemplate chat_template;                 // kNone = the messages' contents, concatenated
};

struct PreparedRequest {
  GenerationRequest engine;
  std::string request_id;
  bool sparse = false;  // the request asked for (and may get) sparse attention
  int64_t budget = 0;   // tokens per KV head per step when sparse
};

/// Validates `req` and tokenizes its prompt. Errors: InvalidArgument naming the bad field.
absl::StatusOr<PreparedRequest> PrepareRequest(const v1::GenerateRequest& req, const Runtime& runtime,
                                               const RequestLimits& limits);

}  // namespace specontext::generator
