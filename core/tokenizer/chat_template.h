// Built-in chat formats (no Jinja engine): the prompt layouts of the model families we serve.
// A model's Jinja chat_template (tokenizer_config.json, or a GGUF's tokenizer.chat_template) is
// mapped to one of them, with the parameters its text fixes (a default system prompt, Llama 3.1's
// date block), so the rendering equals what the model's own template gives.
// The rendered text contains special tokens as text ("<|im_start|>"). EncodeChat encodes a
// rendering so that only the template's own special tokens become special ids: special-token text
// inside a message ("<|eot_id|>" typed by a user) stays ordinary text and cannot forge a turn.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tokenizer/tokenizer.h"

namespace specontext {

enum class ChatTemplateKind {
  kNone,    // plain concatenation of the contents (base models)
  kLlama3,  // <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
  kChatml,  // Qwen2 / Qwen2.5: <|im_start|>role\ncontent<|im_end|>\n
  kQwen3,   // chatml + Qwen3's <think> handling of assistant turns and tool responses
  kDeepseekR1,  // <｜begin▁of▁sentence｜>system<｜User｜>..<｜Assistant｜>..<｜end▁of▁sentence｜>
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" (+ "tool" for llama3/chatml/qwen3, "ipython"
                     // for llama3)
  std::string content;
};

/// A built-in format and the parameters a model's template text gives it.
struct ChatTemplate {
  ChatTemplateKind kind = ChatTemplateKind::kNone;
  /// System prompt the template inserts when the first message is not a system message (SmolLM2's
  /// "You are a helpful AI assistant named SmolLM, ...", Qwen2.5's "You are Qwen, ..."); "" = none.
  /// chatml only.
  std::string default_system;
  /// llama3: the Llama 3.1/3.2 system turn, always emitted, opening with "Cutting Knowledge Date:
  /// December 2023\nToday Date: <date>\n\n" (Llama 3.0 templates have none).
  bool knowledge_date_block = false;
  /// The <date> of that block; "" = the current local date as "%d %b %Y" (Llama 3.2's
  /// strftime_now). Llama 3.1's default is "26 Jul 2024".
  std::string today_date;
};

/// "none", "llama3", "chatml", "qwen3", "deepseek-r1" -> kind; InvalidArgument naming the choices.
absl::StatusOr<ChatTemplateKind> ParseChatTemplateKind(std::string_view name);
std::string_view ChatTemplateKindName(ChatTemplateKind kind);
/// A template by name, with its family's defaults: "llama3" is Llama 3.1's layout (date block,
/// "26 Jul 2024"); the others have no default system prompt.
absl::StatusOr<ChatTemplate> ParseChatTemplate(std::string_view name);

/// Recognises the family from a Jinja chat_template text; kNone when it is not one we know.
ChatTemplateKind DetectChatTemplateKind(std::string_view jinja_template);
/// The built-in template that renders like `jinja_template`, with the default system prompt and
/// date block its text holds. Unimplemented when it is none of ours (rendering another layout
/// would silently change the prompt the model was trained on).
absl::StatusOr<ChatTemplate> ChatTemplateFromJinja(std::string_view jinja_template);
/// Same for tokenizer_config.json text ("chat_template": a string, or a list of named templates
/// whose "default" is used); nullopt when it has none.
absl::StatusOr<std::optional<ChatTemplate>> ChatTemplateFromConfig(
    std::string_view tokenizer_config_json);

/// Renders `messages`; with `add_generation_prompt` the text ends with the opening of an assistant
/// turn. InvalidArgument for a role the format does not have, or no messages.
absl::StatusOr<std::string> ApplyChatTemplate(const ChatTemplate& tmpl,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt);

/// A piece of a rendering: the template's own text, or text copied from a message (contents,
/// Qwen3's reasoning, a tool result).
struct ChatPart {
  std::string text;
  bool from_message = false;
};
/// ApplyChatTemplate as parts (adjacent parts of the same kind are joined); they concatenate to
/// ApplyChatTemplate's text.
absl::StatusOr<std::vector<ChatPart>> RenderChatParts(const ChatTemplate& tmpl,
                                                      std::span<const ChatMessage> messages,
                                                      bool add_generation_prompt);
/// Renders and encodes `messages` with special tokens recognised only in the template's own text
/// (Tokenizer::EncodeParts). `add_bos` as for Encode: false for templates that write their BOS.
absl::StatusOr<std::vector<int32_t>> EncodeChat(const Tokenizer& tokenizer,
                                                const ChatTemplate& tmpl,
                                                std::span<const ChatMessage> messages,
                                                bool add_generation_prompt, bool add_bos);

}  // namespace specontext
