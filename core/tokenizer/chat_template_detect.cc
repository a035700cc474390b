// Reading a model's Jinja chat template: which built-in format renders it, and the parameters its
// text fixes. No Jinja is evaluated; the facts come from the published templates:
//  - Llama 3.0 writes header turns only; Llama 3.1 always writes a system turn opening with
//    "Cutting Knowledge Date: December 2023\nToday Date: " + date_string, whose default it sets
//    (`set date_string = "26 Jul 2024"`); Llama 3.2 takes strftime_now("%d %b %Y") when the
//    renderer defines it (transformers does), i.e. today.
//  - chatml templates that put a fixed system turn when the conversation has none (SmolLM2,
//    Qwen2.5) spell it as one string literal: '<|im_start|>system\n' TEXT '<|im_end|>\n'.
#include <optional>

#include "absl/strings/str_cat.h"
#include "core/tokenizer/chat_template.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

// The string literals inside the Jinja tags ({{ ... }}, {% ... %}) of `t`, unescaped (\n, \t,
// \\, \', \" as Python reads them).
std::vector<std::string> JinjaStringLiterals(std::string_view t) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < t.size()) {
    const size_t open = t.find('{', i);
    if (open == std::string_view::npos || open + 1 >= t.size()) break;
    const char kind = t[open + 1];
    if (kind != '{' && kind != '%') {
      i = open + 1;
      continue;
    }
    const char close = kind == '{' ? '}' : '%';
    i = open + 2;
    while (i < t.size()) {
      const char c = t[i];
      if (c == close && i + 1 < t.size() && t[i + 1] == '}') {
        i += 2;
        break;
      }
      if (c != '\'' && c != '"') {
        ++i;
        continue;
      }
      std::string lit;
      for (++i; i < t.size() && t[i] != c; ++i) {
        if (t[i] == '\\' && i + 1 < t.size()) {
          const char e = t[++i];
          lit.push_back(e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e);
        } else {
          lit.push_back(t[i]);
        }
      }
      ++i;  // the closing quote
      out.push_back(std::move(lit));
    }
  }
  return out;
}

// The system prompt a chatml template inserts on its own, or "".
std::string DefaultChatmlSystem(std::string_view t) {
  constexpr std::string_view kOpen = "<|im_start|>system\n", kClose = "<|im_end|>";
  for (const std::string& lit : JinjaStringLiterals(t)) {
    if (lit.compare(0, kOpen.size(), kOpen) != 0) continue;
    const size_t end = lit.find(kClose, kOpen.size());
    if (end != std::string::npos) return lit.substr(kOpen.size(), end - kOpen.size());
  }
  return "";
}

// The literal date_string default of a Llama 3.1 template ("26 Jul 2024").
std::string DefaultDate(std::string_view t) {
  constexpr std::string_view kSet = "date_string = ";
  for (size_t at = t.find(kSet); at != std::string_view::npos; at = t.find(kSet, at + 1)) {
    const size_t q = at + kSet.size();
    if (q >= t.size() || (t[q] != '"' && t[q] != '\'')) continue;
    const size_t end = t.find(t[q], q + 1);
    if (end != std::string_view::npos) return std::string(t.substr(q + 1, end - q - 1));
  }
  return "26 Jul 2024";
}

}  // namespace

ChatTemplateKind DetectChatTemplateKind(std::string_view t) {
  if (t.find("<|start_header_id|>") != std::string_view::npos) return ChatTemplateKind::kLlama3;
  if (t.find("<｜User｜>") != std::string_view::npos ||
      t.find("<｜Assistant｜>") != std::string_view::npos) {
    return ChatTemplateKind::kDeepseekR1;
  }
  if (t.find("<|im_start|>") != std::string_view::npos) {
    return t.find("<think>") != std::string_view::npos ||
                   t.find("reasoning_content") != std::string_view::npos
               ? ChatTemplateKind::kQwen3
               : ChatTemplateKind::kChatml;
  }
  return ChatTemplateKind::kNone;
}

absl::StatusOr<ChatTemplate> ChatTemplateFromJinja(std::string_view t) {
  ChatTemplate out;
  out.kind = DetectChatTemplateKind(t);
  switch (out.kind) {
    case ChatTemplateKind::kNone:
      return absl::UnimplementedError(
          "the model's chat template is not one of the built-in formats (llama3, chatml, qwen3, "
          "deepseek-r1): pass --chat-template NAME to choose one, or none for raw text");
    case ChatTemplateKind::kChatml:
      out.default_system = DefaultChatmlSystem(t);
      break;
    case ChatTemplateKind::kLlama3:
      out.knowledge_date_block = t.find("Cutting Knowledge Date") != std::string_view::npos;
      if (out.knowledge_date_block && t.find("strftime_now") == std::string_view::npos) {
        out.today_date = DefaultDate(t);
      }
      break;
    default:
      break;
  }
  return out;
}

absl::StatusOr<std::optional<ChatTemplate>> ChatTemplateFromConfig(std::string_view config_json) {
  const auto j = nlohmann::json::parse(config_json.begin(), config_json.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config.json is not a JSON object");
  }
  const auto it = j.find("chat_template");
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) {
    if (it->get_ref<const std::string&>().empty()) return std::nullopt;
    return ChatTemplateFromJinja(it->get_ref<const std::string&>());
  }
  // A list of named templates: [{"name": "default", "template": "..."}, ...].
  if (it->is_array()) {
    for (const auto& entry : *it) {
      if (entry.is_object() && entry.contains("name") && entry["name"] == "default" &&
          entry.contains("template") && entry["template"].is_string()) {
        return ChatTemplateFromJinja(entry["template"].get_ref<const std::string&>());
      }
    }
    return std::nullopt;
  }
  return absl::InvalidArgumentError(
      "tokenizer_config.json: chat_template must be a string or list");
}

}  // namespace specontext
