#include "core/tokenizer/chat_template.h"

#include <algorithm>
#include <ctime>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

constexpr std::string_view kWhite = " \t\n\r\f\v";

// Collects a rendering as parts, so that text copied from messages can be told from the
// template's own text when it is encoded.
class PartWriter {
 public:
  template <typename... T>
  void Template(const T&... pieces) {
    Append(false, absl::StrCat(pieces...));
  }
  void Message(std::string_view text) { Append(true, text); }
  std::vector<ChatPart> Take() && { return std::move(parts_); }

 private:
  void Append(bool from_message, std::string_view text) {
    if (text.empty()) return;
    if (!parts_.empty() && parts_.back().from_message == from_message) {
      parts_.back().text += text;
    } else {
      parts_.push_back({std::string(text), from_message});
    }
  }
  std::vector<ChatPart> parts_;
};

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
std::vector<ChatPart> RenderLlama3(const ChatTemplate& tmpl, std::span<const ChatMessage> messages,
                                   bool gen) {
  PartWriter out;
  out.Template("<|begin_of_text|>");
  size_t first = 0;
  if (tmpl.knowledge_date_block) {
    std::string_view system;
    if (messages[0].role == "system") {
      system = Trim(messages[0].content);
      first = 1;
    }
    out.Template(
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: ",
        tmpl.today_date.empty() ? LocalDate() : tmpl.today_date, "\n\n");
    out.Message(system);
    out.Template("<|eot_id|>");
  }
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (tmpl.knowledge_date_block && (m.role == "tool" || m.role == "ipython")) {
      out.Template("<|start_header_id|>ipython<|end_header_id|>\n\n");
      out.Message(
          nlohmann::json(m.content).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      out.Template("<|eot_id|>");
      continue;
    }
    out.Template("<|start_header_id|>", m.role, "<|end_header_id|>\n\n");
    out.Message(Trim(m.content));
    out.Template("<|eot_id|>");
  }
  if (gen) out.Template("<|start_header_id|>assistant<|end_header_id|>\n\n");
  return std::move(out).Take();
}

// Qwen2/2.5, SmolLM2: a template's default system prompt stands in for a missing first system
// message.
std::vector<ChatPart> RenderChatml(const ChatTemplate& tmpl, std::span<const ChatMessage> messages,
                                   bool gen) {
  PartWriter out;
  if (!tmpl.default_system.empty() && messages[0].role != "system") {
    out.Template("<|im_start|>system\n", tmpl.default_system, "<|im_end|>\n");
  }
  for (const ChatMessage& m : messages) {
    out.Template("<|im_start|>", m.role, "\n");
    out.Message(m.content);
    out.Template("<|im_end|>\n");
  }
  if (gen) out.Template("<|im_start|>assistant\n");
  return std::move(out).Take();
}

bool IsToolResponse(const ChatMessage& m) {
  const std::string_view c = m.content;
  return c.starts_with("<tool_response>") && c.ends_with("</tool_response>");
}

// Qwen3's template: reasoning (<think>..</think>) is kept only for assistant turns after the last
// real user query; the last such turn always shows a (possibly empty) think block. Consecutive tool
// messages are wrapped in <tool_response> inside one user turn.
std::vector<ChatPart> RenderQwen3(std::span<const ChatMessage> messages, bool gen) {
  size_t last_query = messages.size() - 1;
  for (size_t i = messages.size(); i-- > 0;) {
    if (messages[i].role == "user" && !IsToolResponse(messages[i])) {
      last_query = i;
      break;
    }
  }
  PartWriter out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user" || m.role == "system") {
      out.Template("<|im_start|>", m.role, "\n");
      out.Message(m.content);
      out.Template("<|im_end|>\n");
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
        out.Template("<|im_start|>assistant\n<think>\n");
        out.Message(Trim(reasoning, "\n"));
        out.Template("\n</think>\n\n");
        out.Message(LStrip(content, "\n"));
      } else {
        out.Template("<|im_start|>assistant\n");
        out.Message(content);
      }
      out.Template("<|im_end|>\n");
    } else {  // tool
      if (i == 0 || messages[i - 1].role != "tool") out.Template("<|im_start|>user");
      out.Template("\n<tool_response>\n");
      out.Message(m.content);
      out.Template("\n</tool_response>");
      if (i + 1 == messages.size() || messages[i + 1].role != "tool") out.Template("<|im_end|>\n");
    }
  }
  if (gen) out.Template("<|im_start|>assistant\n");
  return std::move(out).Take();
}

// DeepSeek-R1: system prompts go first after BOS; history assistant turns lose their reasoning.
std::vector<ChatPart> RenderDeepseekR1(std::span<const ChatMessage> messages, bool gen) {
  PartWriter out;
  out.Template("<｜begin▁of▁sentence｜>");
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!first_system) out.Template("\n\n");
    out.Message(m.content);
    first_system = false;
  }
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      out.Template("<｜User｜>");
      out.Message(m.content);
    } else if (m.role == "assistant") {
      std::string_view content = m.content;
      if (const size_t close = content.rfind("</think>"); close != std::string_view::npos) {
        content = content.substr(close + 8);
      }
      out.Template("<｜Assistant｜>");
      out.Message(content);
      out.Template("<｜end▁of▁sentence｜>");
    }
  }
  if (gen) out.Template("<｜Assistant｜><think>\n");
  return std::move(out).Take();
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

absl::StatusOr<std::vector<ChatPart>> RenderChatParts(const ChatTemplate& tmpl,
                                                      std::span<const ChatMessage> messages,
                                                      bool add_generation_prompt) {
  const ChatTemplateKind kind = tmpl.kind;
  switch (kind) {
    case ChatTemplateKind::kNone: {
      RETURN_IF_ERROR(CheckRoles(kind, messages, {"system", "user", "assistant"}));
      PartWriter out;
      for (const ChatMessage& m : messages) out.Message(m.content);
      return std::move(out).Take();
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

absl::StatusOr<std::string> ApplyChatTemplate(const ChatTemplate& tmpl,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt) {
  ASSIGN_OR_RETURN(std::vector<ChatPart> parts,
                   RenderChatParts(tmpl, messages, add_generation_prompt));
  std::string out;
  for (const ChatPart& p : parts) out += p.text;
  return out;
}

absl::StatusOr<std::vector<int32_t>> EncodeChat(const Tokenizer& tokenizer,
                                                const ChatTemplate& tmpl,
                                                std::span<const ChatMessage> messages,
                                                bool add_generation_prompt, bool add_bos) {
  ASSIGN_OR_RETURN(std::vector<ChatPart> parts,
                   RenderChatParts(tmpl, messages, add_generation_prompt));
  std::vector<TextPart> text_parts;
  text_parts.reserve(parts.size());
  for (const ChatPart& p : parts) text_parts.push_back({p.text, !p.from_message});
  return tokenizer.EncodeParts(text_parts, add_bos);
}

}  // namespace specontext
