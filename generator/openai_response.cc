#include "generator/openai_response.h"

#include <nlohmann/json.hpp>

namespace specontext::generator {
namespace {

using json = nlohmann::json;

// Model text may hold invalid UTF-8 (a byte token cut from its character): replaced, never thrown.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json Usage(const OpenAiChoice& c) {
  return {{"prompt_tokens", c.prompt_tokens},
          {"completion_tokens", c.completion_tokens},
          {"total_tokens", c.prompt_tokens + c.completion_tokens}};
}

json FinishReason(const OpenAiChoice& c) { return c.finish_reason.empty() ? json(nullptr) : json(c.finish_reason); }

}  // namespace

v1::GenerateRequest ToGenerateRequest(const OpenAiRequest& req, int64_t context_tokens) {
  v1::GenerateRequest out;
  if (req.endpoint == OpenAiEndpoint::kCompletions) {
    if (!req.prompt_ids.empty()) {
      out.mutable_token_ids()->Add(req.prompt_ids.begin(), req.prompt_ids.end());
    } else {
      out.set_prompt(req.prompt);
    }
  } else {
    for (const OpenAiMessage& m : req.messages) {
      v1::ChatMessage* cm = out.add_messages();
      cm->set_role(m.role);
      cm->set_content(m.content);
    }
  }
  const int64_t fallback = req.endpoint == OpenAiEndpoint::kCompletions ? kDefaultCompletionMaxTokens
                                                                          : std::max<int64_t>(1, context_tokens);
  const int64_t max_tokens = req.max_tokens.value_or(fallback);
  // Beyond int32 the proto field cannot hold it; PrepareRequest refuses anything past its limit anyway.
  out.set_max_new_tokens(static_cast<int32_t>(std::min<int64_t>(max_tokens, INT32_MAX)));
  v1::SamplingOptions* s = out.mutable_sampling();
  s->set_temperature(static_cast<float>(req.temperature));
  if (req.top_p.has_value()) s->set_top_p(static_cast<float>(*req.top_p));
  s->set_top_k(static_cast<int32_t>(req.top_k));
  if (req.has_seed) s->set_seed(req.seed);
  for (const std::string& stop : req.stop) out.add_stop(stop);
  if (req.budget.has_value()) out.mutable_sparsity()->set_budget(static_cast<int32_t>(*req.budget));
  if (req.dense) out.mutable_sparsity()->set_dense(true);
  out.set_ignore_eos(req.ignore_eos);
  return out;
}

const char* OpenAiFinishReason(v1::FinishReason reason) {
  return reason == v1::FINISH_REASON_LENGTH ? "length" : "stop";
}

std::string CompletionJson(OpenAiEndpoint endpoint, const OpenAiChoice& c) {
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", FinishReason(c)}};
  const bool chat = endpoint == OpenAiEndpoint::kChatCompletions;
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", c.text}};
  } else {
    choice["text"] = c.text;
  }
  return Dump({{"id", c.id},
               {"object", chat ? "chat.completion" : "text_completion"},
               {"created", c.created},
               {"model", c.model},
               {"choices", json::array({choice})},
               {"usage", Usage(c)}});
}

std::string ChunkJson(OpenAiEndpoint endpoint, const OpenAiChoice& c, bool first, bool usage_only) {
  const bool chat = endpoint == OpenAiEndpoint::kChatCompletions;
  json out = {{"id", c.id},
              {"object", chat ? "chat.completion.chunk" : "text_completion"},
              {"created", c.created},
              {"model", c.model}};
  if (usage_only) {
    out["choices"] = json::array();
    out["usage"] = Usage(c);
    return Dump(out);
  }
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", FinishReason(c)}};
  if (chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!c.text.empty() || c.finish_reason.empty()) delta["content"] = c.text;
    choice["delta"] = delta;
  } else {
    choice["text"] = c.text;
  }
  out["choices"] = json::array({choice});
  return Dump(out);
}

std::string ModelsJson(const std::string& model, int64_t created) {
  return Dump({{"object", "list"},
               {"data", json::array({{{"id", model}, {"object", "model"}, {"created", created},
                                      {"owned_by", "specontext"}}})}});
}

std::string ErrorJson(const HttpError& error, const std::string& param, const std::string& code) {
  return Dump({{"error",
                {{"message", error.message},
                 {"type", error.type},
                 {"param", param.empty() ? json(nullptr) : json(param)},
                 {"code", code.empty() ? json(nullptr) : json(code)}}}});
}

size_t CompleteUtf8Prefix(std::string_view text) {
  // Look back at most 3 bytes for the lead byte of a sequence that the text cuts short.
  const size_t n = text.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const unsigned char b = static_cast<unsigned char>(text[n - back]);
    if ((b & 0xC0) == 0x80) continue;  // a continuation byte: keep looking for the lead
    size_t need = 1;
    if ((b & 0xE0) == 0xC0) need = 2;
    else if ((b & 0xF0) == 0xE0) need = 3;
    else if ((b & 0xF8) == 0xF0) need = 4;
    return back < need ? n - back : n;  // an ASCII or invalid lead byte: nothing to wait for
  }
  return n;  // only continuation bytes: invalid, nothing to wait for
}

}  // namespace specontext::generator
