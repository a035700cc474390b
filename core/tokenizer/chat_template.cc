#include "core/tokenizer/chat_template.h"

#include <algorithm>
#include <ctime>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

constexpr std::string_view kWhite = " \t\n\r\f\v";

std::string_view Trim(std::string_view s, std::string_view chars = kWhite) {
  const size_t b = s.find_first_not_of(chars);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(chars) - b + 1);
}
std::string_view LStrip(std::string_view s, std::string_view chars) {
  const size_t b = s.find_first_not_of(chars);
  return b == std::string_view::npos ? std::string_view() : s.substr(b);
}
std::string_view RStrip(std::string_view s, std::string_view chars) {
  const size_t e = s.find_last_not_of(chars);
  return e == std::string_view::npos ? std::string_view() : s.substr(0, e + 1);
}

std::string JoinRoles(std::initializer_list<std::string_view> roles) {
  std::string out;
  for (const std::string_view r : roles) {
    if (!out.empty()) out += ", ";
    out += r;
  }
  return out;
}

absl::Status CheckRoles(ChatTemplateKind kind, std::span<const ChatMessage> messages,
                        std::initializer_list<std::string_view> allowed) {
  if (messages.empty()) return absl::InvalidArgumentError("chat template: no messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    if (std::find(allowed.begin(), allowed.end(), messages[i].role) == allowed.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template ", std::string(ChatTemplateKindName(kind)), ": message ", i,
                       " has role '", messages[i].role, "'; allowed: ", JoinRoles(allowed)));
    }
  }
  return absl::OkStatus();
}

// The current local date as Llama 3.2's template writes it (strftime_now("%d %b %Y")).
std::string LocalDate() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[32];
  return std::string(buf, std::strftime(buf, sizeof(buf), "%d %b %Y", &tm));
}

// Llama 3.0: every message as a header turn, contents trimmed. Llama 3.1/3.2
// (knowledge_date_block): a first system turn is always written, with the date block before the
// (trimmed) first system message; tool results become "ipython" turns whose content the template
// writes with tojson (a string is iterable in Jinja), i.e. as a JSON string.
std::string RenderLlama3(const ChatTemplate& tmpl, std::span<const ChatMessage> messages,
                         bool gen) {
  std::string out = "<|begin_of_text|>";
  size_t first = 0;
  if (tmpl.knowledge_date_block) {
    std::string_view system;
    if (messages[0].role == "system") {
      system = Trim(messages[0].content);
      first = 1;
    }
    absl::StrAppend(&out,
                    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: ",
                    tmpl.today_date.empty() ? LocalDate() : tmpl.today_date, "\n\n",
                    std::string(system), "<|eot_id|>");
  }
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (tmpl.knowledge_date_block && (m.role == "tool" || m.role == "ipython")) {
      absl::StrAppend(
          &out, "<|start_header_id|>ipython<|end_header_id|>\n\n",
          nlohmann::json(m.content).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace),
          "<|eot_id|>");
      continue;
    }
    absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n",
                    std::string(Trim(m.content)), "<|eot_id|>");
  }
  if (gen) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

// Qwen2/2.5, SmolLM2: a template's default system prompt stands in for a missing first system
// message.
std::string RenderChatml(const ChatTemplate& tmpl, std::span<const ChatMessage> messages,
                         bool gen) {
  std::string out;
  if (!tmpl.default_system.empty() && messages[0].role != "system") {
    absl::StrAppend(&out, "<|im_start|>system\n", tmpl.default_system, "<|im_end|>\n");
  }
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
  }
  if (gen) out += "<|im_start|>assistant\n";
  return out;
}

bool IsToolResponse(const ChatMessage& m) {
  const std::string_view c = m.content;
  return c.starts_with("<tool_response>") && c.ends_with("</tool_response>");
}

// Qwen3's template: reasoning (<think>..</think>) is kept only for assistant turns after the last
// real user query; the last such turn always shows a (possibly empty) think block. Consecutive tool
// messages are wrapped in <tool_response> inside one user turn.
std::string RenderQwen3(std::span<const ChatMessage> messages, bool gen) {
  size_t last_query = messages.size() - 1;
  for (size_t i = messages.size(); i-- > 0;) {
    if (messages[i].role == "user" && !IsToolResponse(messages[i])) {
      last_query = i;
      break;
    }
  }
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user" || m.role == "system") {
      absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
    } else if (m.role == "assistant") {
      std::string_view content = m.content;
      std::string_view reasoning;
      const size_t close = content.rfind("</think>");
      if (close != std::string_view::npos) {
        const std::string_view before = content.substr(0, content.find("</think>"));
        const size_t open = before.rfind("<think>");
        reasoning = LStrip(
            RStrip(open == std::string_view::npos ? before : before.substr(open + 7), "\n"), "\n");
        content = LStrip(content.substr(close + 8), "\n");
      }
      const bool last = i + 1 == messages.size();
      if (i > last_query && (last || !reasoning.empty())) {
        absl::StrAppend(&out, "<|im_start|>assistant\n<think>\n",
                        std::string(Trim(reasoning, "\n")), "\n</think>\n\n",
                        std::string(LStrip(content, "\n")));
      } else {
        absl::StrAppend(&out, "<|im_start|>assistant\n", std::string(content));
      }
      out += "<|im_end|>\n";
    } else {  // tool
      if (i == 0 || messages[i - 1].role != "tool") out += "<|im_start|>user";
      absl::StrAppend(&out, "\n<tool_response>\n", m.content, "\n</tool_response>");
      if (i + 1 == messages.size() || messages[i + 1].role != "tool") out += "<|im_end|>\n";
    }
  }
  if (gen) out += "<|im_start|>assistant\n";
  return out;
}

// DeepSeek-R1: system prompts go first after BOS; history assistant turns lose their reasoning.
std::string RenderDeepseekR1(std::span<const ChatMessage> messages, bool gen) {
  std::string out = "<｜begin▁of▁sentence｜>";
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!first_system) out += "\n\n";
    out += m.content;
    first_system = false;
  }
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      absl::StrAppend(&out, "<｜User｜>", m.content);
    } else if (m.role == "assistant") {
      std::string_view content = m.content;
      if (const size_t close = content.rfind("</think>"); close != std::string_view::npos) {
        content = content.substr(close + 8);
      }
      absl::StrAppend(&out, "<｜Assistant｜>", std::string(content), "<｜end▁of▁sentence｜>");
    }
  }
  if (gen) out += "<｜Assistant｜><think>\n";
  return out;
}

}  // namespace

absl::StatusOr<ChatTemplateKind> ParseChatTemplateKind(std::string_view name) {
  if (name == "none") return ChatTemplateKind::kNone;
  if (name == "llama3") return ChatTemplateKind::kLlama3;
  if (name == "chatml") return ChatTemplateKind::kChatml;
  if (name == "qwen3") return ChatTemplateKind::kQwen3;
  if (name == "deepseek-r1") return ChatTemplateKind::kDeepseekR1;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown chat template '", std::string(name),
                   "'; expected one of none, llama3, chatml, qwen3, deepseek-r1"));
}

std::string_view ChatTemplateKindName(ChatTemplateKind kind) {
  switch (kind) {
    case ChatTemplateKind::kNone:
      return "none";
    case ChatTemplateKind::kLlama3:
      return "llama3";
    case ChatTemplateKind::kChatml:
      return "chatml";
    case ChatTemplateKind::kQwen3:
      return "qwen3";
    case ChatTemplateKind::kDeepseekR1:
      return "deepseek-r1";
  }
  return "none";
}

absl::StatusOr<ChatTemplate> ParseChatTemplate(std::string_view name) {
  ChatTemplate t;
  ASSIGN_OR_RETURN(t.kind, ParseChatTemplateKind(name));
  if (t.kind == ChatTemplateKind::kLlama3) {
    t.knowledge_date_block = true;
    t.today_date = "26 Jul 2024";
  }
  return t;
}

absl::StatusOr<std::string> ApplyChatTemplate(const ChatTemplate& tmpl,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt) {
  const ChatTemplateKind kind = tmpl.kind;
  switch (kind) {
    case ChatTemplateKind::kNone: {
      RETURN_IF_ERROR(CheckRoles(kind, messages, {"system", "user", "assistant"}));
      std::string out;
      for (const ChatMessage& m : messages) out += m.content;
      return out;
    }
    case ChatTemplateKind::kLlama3:
      RETURN_IF_ERROR(
          CheckRoles(kind, messages, {"system", "user", "assistant", "ipython", "tool"}));
      return RenderLlama3(tmpl, messages, add_generation_prompt);
    case ChatTemplateKind::kChatml:
      RETURN_IF_ERROR(CheckRoles(kind, messages, {"system", "user", "assistant", "tool"}));
      return RenderChatml(tmpl, messages, add_generation_prompt);
    case ChatTemplateKind::kQwen3:
      RETURN_IF_ERROR(CheckRoles(kind, messages, {"system", "user", "assistant", "tool"}));
      return RenderQwen3(messages, add_generation_prompt);
    case ChatTemplateKind::kDeepseekR1:
      RETURN_IF_ERROR(CheckRoles(kind, messages, {"system", "user", "assistant"}));
      return RenderDeepseekR1(messages, add_generation_prompt);
  }
  return absl::InvalidArgumentError("chat template: bad kind");
}

}  // namespace specontext
