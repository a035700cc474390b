#include "generator/openai_request.h"

#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace specontext::generator {
namespace {

using json = nlohmann::json;

// Reads the fields of one request object. Every accessor checks the type first: nlohmann's
// throwing conversions are never reached.
class FieldReader {
 public:
  FieldReader(const json& obj, std::string* param) : obj_(obj), param_(param) {}

  // The field, or null when it is absent or JSON null (OpenAI treats both as "not set").
  const json* Get(const char* name) const {
    auto it = obj_.find(name);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::Status Error(const char* name, const std::string& what) const {
    if (param_ != nullptr) *param_ = name;
    return absl::InvalidArgumentError(absl::StrCat(name, " ", what));
  }

  absl::Status String(const char* name, std::string* out) const {
    const json* v = Get(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_string()) return Error(name, "must be a string");
    *out = v->get_ref<const std::string&>();
    return absl::OkStatus();
  }

  absl::Status Bool(const char* name, bool* out) const {
    const json* v = Get(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) return Error(name, "must be true or false");
    *out = v->get<bool>();
    return absl::OkStatus();
  }

  absl::Status Int(const char* name, std::optional<int64_t>* out) const {
    const json* v = Get(name);
    if (v == nullptr) return absl::OkStatus();
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return Error(name, "is too large");
      *out = static_cast<int64_t>(u);
      return absl::OkStatus();
    }
    if (!v->is_number_integer()) return Error(name, "must be an integer");
    *out = v->get<int64_t>();
    return absl::OkStatus();
  }

  absl::Status Number(const char* name, std::optional<double>* out) const {
    const json* v = Get(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number()) return Error(name, "must be a number");
    const double d = v->get<double>();
    if (!std::isfinite(d)) return Error(name, "must be finite");
    *out = d;
    return absl::OkStatus();
  }

  // A feature this server does not have: refused unless the value asks for nothing.
  absl::Status Unsupported(const char* name, const json& off) const {
    const json* v = Get(name);
    if (v == nullptr || *v == off) return absl::OkStatus();
    return Error(name, "is not supported by this server");
  }

 private:
  const json& obj_;
  std::string* param_;
};

absl::Status ParseStop(const FieldReader& r, std::vector<std::string>* out) {
  const json* v = r.Get("stop");
  if (v == nullptr) return absl::OkStatus();
  if (v->is_string()) {
    out->push_back(v->get_ref<const std::string&>());
    return absl::OkStatus();
  }
  if (!v->is_array()) return r.Error("stop", "must be a string or a list of strings");
  for (const json& s : *v) {
    if (!s.is_string()) return r.Error("stop", "must be a string or a list of strings");
    out->push_back(s.get_ref<const std::string&>());
  }
  return absl::OkStatus();
}

absl::Status ParsePrompt(const FieldReader& r, OpenAiRequest* req) {
  const json* v = r.Get("prompt");
  if (v == nullptr) return r.Error("prompt", "is required");
  if (v->is_string()) {
    req->prompt = v->get_ref<const std::string&>();
    return absl::OkStatus();
  }
  if (!v->is_array()) return r.Error("prompt", "must be a string, a list of one string or a list of token ids");
  // One prompt per request: a list of several prompts would be a batch (n > 1 in effect).
  if (v->size() == 1 && (*v)[0].is_string()) {
    req->prompt = (*v)[0].get_ref<const std::string&>();
    return absl::OkStatus();
  }
  if (v->size() == 1 && (*v)[0].is_array()) v = &(*v)[0];  // [[ids]]: one tokenized prompt
  for (const json& t : *v) {
    if (!t.is_number_integer()) {
      return r.Error("prompt", "must be a string, a list of one string or a list of token ids (one prompt "
                               "per request)");
    }
    const int64_t id = t.get<int64_t>();
    // The vocabulary check proper is PrepareRequest's; this only keeps the value in int32.
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return r.Error("prompt", "holds a negative or huge token id");
    }
    req->prompt_ids.push_back(static_cast<int32_t>(id));
  }
  return absl::OkStatus();
}

absl::Status ParseMessages(const FieldReader& r, OpenAiRequest* req) {
  const json* v = r.Get("messages");
  if (v == nullptr) return r.Error("messages", "is required");
  if (!v->is_array() || v->empty()) return r.Error("messages", "must be a non-empty list");
  for (size_t i = 0; i < v->size(); ++i) {
    const json& m = (*v)[i];
    const std::string at = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return r.Error("messages", absl::StrCat("holds ", at, " that is not an object"));
    OpenAiMessage out;
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      return r.Error("messages", absl::StrCat("holds ", at, " without a string role"));
    }
    out.role = role->get_ref<const std::string&>();
    // "developer" is OpenAI's newer name for "system".
    if (out.role == "developer") out.role = "system";
    auto content = m.find("content");
    if (content == m.end() || content->is_null()) {
      // An assistant turn may carry tool calls instead; this server has none, so it is empty text.
    } else if (content->is_string()) {
      out.content = content->get_ref<const std::string&>();
    } else if (content->is_array()) {
      for (const json& part : *content) {
        auto type = part.is_object() ? part.find("type") : part.end();
        auto text = part.is_object() ? part.find("text") : part.end();
        if (!part.is_object() || type == part.end() || *type != "text" || text == part.end() ||
            !text->is_string()) {
          return r.Error("messages", absl::StrCat("holds ", at, ".content with a part that is not text"));
        }
        out.content += text->get_ref<const std::string&>();
      }
    } else {
      return r.Error("messages", absl::StrCat("holds ", at, ".content that is neither a string nor a list"));
    }
    req->messages.push_back(std::move(out));
  }
  return absl::OkStatus();
}

absl::Status ParseObject(const json& body, OpenAiEndpoint endpoint, std::string* param, OpenAiRequest* req) {
  const FieldReader r(body, param);
  req->endpoint = endpoint;
  if (absl::Status st = r.String("model", &req->model); !st.ok()) return st;
  if (endpoint == OpenAiEndpoint::kCompletions) {
    if (absl::Status st = ParsePrompt(r, req); !st.ok()) return st;
  } else {
    if (absl::Status st = ParseMessages(r, req); !st.ok()) return st;
  }
  std::optional<int64_t> n, max_tokens, max_completion_tokens, seed, top_k, budget, best_of;
  std::optional<double> temperature, top_p;
  for (auto [name, out] : {std::pair{"n", &n}, {"max_tokens", &max_tokens},
                           {"max_completion_tokens", &max_completion_tokens}, {"seed", &seed},
                           {"top_k", &top_k}, {"budget", &budget}, {"best_of", &best_of}}) {
    if (absl::Status st = r.Int(name, out); !st.ok()) return st;
  }
  if (n.has_value() && *n != 1) return r.Error("n", absl::StrCat("must be 1 (one choice per request), got ", *n));
  if (best_of.has_value() && *best_of != 1) return r.Error("best_of", "is not supported by this server");
  if (max_tokens.has_value() && max_completion_tokens.has_value() && *max_tokens != *max_completion_tokens) {
    return r.Error("max_completion_tokens", "differs from max_tokens: set one of them");
  }
  req->max_tokens = max_completion_tokens.has_value() ? max_completion_tokens : max_tokens;
  if (req->max_tokens.has_value() && *req->max_tokens < 1) {
    return r.Error(max_completion_tokens.has_value() ? "max_completion_tokens" : "max_tokens",
                   absl::StrCat("must be >= 1, got ", *req->max_tokens));
  }
  if (absl::Status st = r.Number("temperature", &temperature); !st.ok()) return st;
  if (absl::Status st = r.Number("top_p", &top_p); !st.ok()) return st;
  if (temperature.has_value()) {
    if (*temperature < 0 || *temperature > 2) return r.Error("temperature", "must be in [0, 2]");
    req->temperature = *temperature;
  }
  if (top_p.has_value() && !(*top_p > 0 && *top_p <= 1)) return r.Error("top_p", "must be in (0, 1]");
  req->top_p = top_p;
  if (top_k.has_value()) {
    if (*top_k < 0 || *top_k > std::numeric_limits<int32_t>::max()) return r.Error("top_k", "must be >= 0");
    req->top_k = *top_k;
  }
  if (seed.has_value()) {
    req->seed = static_cast<uint64_t>(*seed);
    req->has_seed = true;
  }
  if (budget.has_value()) {
    if (*budget < 1 || *budget > std::numeric_limits<int32_t>::max()) return r.Error("budget", "must be >= 1");
    req->budget = budget;
  }
  if (absl::Status st = ParseStop(r, &req->stop); !st.ok()) return st;
  for (auto [name, out] : {std::pair{"stream", &req->stream}, {"dense", &req->dense},
                           {"ignore_eos", &req->ignore_eos}}) {
    if (absl::Status st = r.Bool(name, out); !st.ok()) return st;
  }
  if (const json* so = r.Get("stream_options"); so != nullptr) {
    if (!so->is_object()) return r.Error("stream_options", "must be an object");
    auto iu = so->find("include_usage");
    if (iu != so->end() && !iu->is_null()) {
      if (!iu->is_boolean()) return r.Error("stream_options", "include_usage must be true or false");
      req->include_usage = iu->get<bool>();
    }
  }
  if (absl::Status st = r.String("user", &req->user); !st.ok()) return st;
  // What this server cannot do is refused rather than silently ignored.
  for (const char* name : {"logprobs", "echo"}) {
    if (absl::Status st = r.Unsupported(name, json(false)); !st.ok()) return st;
  }
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    if (absl::Status st = r.Unsupported(name, json(0)); !st.ok()) return st;
  }
  for (const char* name : {"top_logprobs", "suffix", "logit_bias", "tools", "functions", "tool_choice",
                           "function_call", "response_format", "audio", "prediction"}) {
    if (r.Get(name) != nullptr) return r.Error(name, "is not supported by this server");
  }
  if (auto mod = body.find("modalities"); mod != body.end() && !mod->is_null() && *mod != json::array({"text"})) {
    return r.Error("modalities", "must be [\"text\"]");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(std::string_view body, OpenAiEndpoint endpoint,
                                                 std::string* param) {
  if (param != nullptr) param->clear();
  const json parsed = json::parse(body.begin(), body.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) {
    return absl::InvalidArgumentError("the body is not valid JSON (or not UTF-8)");
  }
  if (!parsed.is_object()) return absl::InvalidArgumentError("the body must be a JSON object");
  OpenAiRequest req;
  if (absl::Status st = ParseObject(parsed, endpoint, param, &req); !st.ok()) return st;
  return req;
}

}  // namespace specontext::generator
