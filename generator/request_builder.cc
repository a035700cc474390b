#include "generator/request_builder.h"

#include <cmath>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/echo.h"
#include "core/status_macros.h"

namespace specontext::generator {
namespace {

absl::Status CheckTokenIds(const google::protobuf::RepeatedField<int32_t>& ids, int64_t vocab, const char* field) {
  for (int i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "] = ", ids[i],
                                                     " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckSampling(const v1::SamplingOptions& s) {
  if (!std::isfinite(s.temperature()) || s.temperature() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.temperature must be a finite number >= 0, got ", s.temperature()));
  }
  if (s.top_k() < 0) return absl::InvalidArgumentError(absl::StrCat("sampling.top_k must be >= 0, got ", s.top_k()));
  if (s.has_top_p() && !(s.top_p() > 0.0f && s.top_p() <= 1.0f)) {  // also rejects NaN
    return absl::InvalidArgumentError(absl::StrCat("sampling.top_p must be in (0, 1], got ", s.top_p()));
  }
  return absl::OkStatus();
}

// Tokenizing costs time in proportion to the text, so a text that cannot fit the context is
// refused before it is tokenized: every token stands for at most MaxBytesPerToken() bytes.
absl::Status CheckCanFit(const Runtime& rt, int64_t bytes) {
  if (rt.tokenizer == nullptr) return absl::OkStatus();
  const std::optional<int64_t> per_token = rt.tokenizer->MaxBytesPerToken();
  if (!per_token.has_value() || *per_token <= 0) return absl::OkStatus();
  const int64_t context = rt.model->config().max_position_embeddings;
  const int64_t at_least = (bytes + *per_token - 1) / *per_token;
  if (at_least < context) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("the prompt is at least ", at_least, " tokens (", bytes,
                   " bytes, at most ", *per_token, " a token); the model's context is ", context,
                   " tokens and at least one must remain for generation"));
}

absl::StatusOr<std::vector<int32_t>> EncodeMessages(const v1::GenerateRequest& req, const Runtime& rt,
                                                    const RequestLimits& limits) {
  if (rt.tokenizer == nullptr) {
    return absl::FailedPreconditionError("chat messages need a tokenizer: start the server with --tokenizer");
  }
  std::vector<ChatMessage> messages;
  int64_t bytes = 0;
  for (int i = 0; i < req.messages_size(); ++i) {
    const v1::ChatMessage& m = req.messages(i);
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat(
          "messages[", i, "].role must be system, user or assistant, got ", EchoValue(m.role())));
    }
    bytes += static_cast<int64_t>(m.content().size());
    messages.push_back({m.role(), m.content()});
  }
  if (bytes > limits.max_prompt_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("the messages hold ", bytes, " bytes; the limit is ",
                                                   limits.max_prompt_bytes));
  }
  ASSIGN_OR_RETURN(std::vector<ChatPart> rendered,
                   RenderChatParts(limits.chat_template, messages, /*add_generation_prompt=*/true));
  int64_t rendered_bytes = 0;
  std::vector<TextPart> parts;
  for (const ChatPart& p : rendered) {
    rendered_bytes += static_cast<int64_t>(p.text.size());
    // Only the template's own special tokens are special: a message cannot close its turn.
    parts.push_back({p.text, /*special_tokens=*/!p.from_message});
  }
  RETURN_IF_ERROR(CheckCanFit(rt, rendered_bytes));
  // Templates that spell out their own BOS token must not get a second one.
  const bool add_bos = limits.chat_template.kind == ChatTemplateKind::kNone && rt.tokenizer->default_add_bos();
  return rt.tokenizer->EncodeParts(parts, add_bos);
}

}  // namespace

absl::StatusOr<PreparedRequest> PrepareRequest(const v1::GenerateRequest& req, const Runtime& rt,
                                               const RequestLimits& limits) {
  const ModelConfig& config = rt.model->config();
  const int n_set = (!req.prompt().empty()) + (req.token_ids_size() > 0) + (req.messages_size() > 0);
  if (n_set == 0) {
    return absl::InvalidArgumentError("the request has no prompt: set one of prompt, token_ids or messages");
  }
  if (n_set > 1) {
    return absl::InvalidArgumentError("set only one of prompt, token_ids or messages");
  }
  if (req.max_new_tokens() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be >= 1, got ", req.max_new_tokens()));
  }
  if (req.max_new_tokens() > limits.max_new_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens is ", req.max_new_tokens(), "; the limit is ",
                                                   limits.max_new_tokens));
  }
  RETURN_IF_ERROR(CheckSampling(req.sampling()));
  RETURN_IF_ERROR(CheckTokenIds(req.stop_token_ids(), config.vocab_size, "stop_token_ids"));
  if (req.stop_size() > limits.max_stop_strings) {
    return absl::InvalidArgumentError(absl::StrCat("at most ", limits.max_stop_strings, " stop strings, got ",
                                                   req.stop_size()));
  }
  for (int i = 0; i < req.stop_size(); ++i) {
    if (req.stop(i).empty() || static_cast<int64_t>(req.stop(i).size()) > limits.max_stop_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] must hold 1 to ", limits.max_stop_bytes,
                                                     " bytes, got ", req.stop(i).size()));
    }
  }

  if (static_cast<int64_t>(req.request_id().size()) > limits.max_request_id_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("request_id is ", req.request_id().size(),
                                                   " bytes; the limit is ",
                                                   limits.max_request_id_bytes));
  }

  PreparedRequest out;
  out.request_id = req.request_id();
  if (req.sparsity().has_budget() && req.sparsity().budget() < 1) {
    return absl::InvalidArgumentError(absl::StrCat("sparsity.budget must be >= 1, got ", req.sparsity().budget()));
  }
  if (req.sparsity().has_budget() && req.sparsity().budget() > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("sparsity.budget ", req.sparsity().budget(),
                                                   " exceeds the model's context of ", config.max_position_embeddings));
  }
  out.budget = req.sparsity().has_budget() ? req.sparsity().budget() : limits.default_budget;
  out.sparse = !req.sparsity().dense() && out.budget > 0;

  GenerationRequest& g = out.engine;
  if (!req.prompt().empty()) {
    if (static_cast<int64_t>(req.prompt().size()) > limits.max_prompt_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("the prompt is ", req.prompt().size(),
                                                     " bytes; the limit is ", limits.max_prompt_bytes));
    }
    RETURN_IF_ERROR(CheckCanFit(rt, static_cast<int64_t>(req.prompt().size())));
    ASSIGN_OR_RETURN(g.prompt, EncodePrompt(rt, req.prompt()));
  } else if (req.token_ids_size() > 0) {
    RETURN_IF_ERROR(CheckTokenIds(req.token_ids(), config.vocab_size, "token_ids"));
    g.prompt.assign(req.token_ids().begin(), req.token_ids().end());
  } else {
    ASSIGN_OR_RETURN(g.prompt, EncodeMessages(req, rt, limits));
  }
  if (static_cast<int64_t>(g.prompt.size()) >= config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt is ", g.prompt.size(),
                                                   " tokens; the model's context is ",
                                                   config.max_position_embeddings,
                                                   " tokens and at least one must remain for generation"));
  }
  g.max_new_tokens = req.max_new_tokens();
  g.sampling.temperature = req.sampling().temperature();
  g.sampling.top_k = req.sampling().top_k();
  g.sampling.top_p = req.sampling().has_top_p() ? req.sampling().top_p() : 1.0f;
  g.sampling.seed = req.sampling().seed();
  g.stop_strings.assign(req.stop().begin(), req.stop().end());
  g.stop_token_ids.assign(req.stop_token_ids().begin(), req.stop_token_ids().end());
  g.ignore_eos = req.ignore_eos();
  // Only read by an engine in sparse mode: a request without a budget (and no --budget) stays dense.
  g.dense = !out.sparse;
  g.budget = out.sparse ? static_cast<int32_t>(out.budget) : 0;
  if (!g.stop_strings.empty() && rt.tokenizer == nullptr) {
    return absl::InvalidArgumentError("stop strings need a tokenizer: start the server with --tokenizer");
  }
  return out;
}

}  // namespace specontext::generator
