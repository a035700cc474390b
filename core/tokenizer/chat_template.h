// Built-in chat formats (no Jinja engine): the prompt layouts of the model families we serve.
// The rendered text contains special tokens as text ("<|im_start|>"); Tokenizer::Encode recognises
// them, so encode it with add_bos=false (llama3 and deepseek-r1 output already starts with BOS).
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

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

/// "none", "llama3", "chatml", "qwen3", "deepseek-r1" -> kind; InvalidArgument naming the choices.
absl::StatusOr<ChatTemplateKind> ParseChatTemplateKind(std::string_view name);
std::string_view ChatTemplateKindName(ChatTemplateKind kind);

/// Recognises the family from a Jinja chat_template text (tokenizer_config.json's "chat_template");
/// kNone when it is not one we know.
ChatTemplateKind DetectChatTemplateKind(std::string_view jinja_template);
/// Same, reading "chat_template" from tokenizer_config.json text (kNone when absent).
absl::StatusOr<ChatTemplateKind> DetectChatTemplateFromConfig(
    std::string_view tokenizer_config_json);

/// Renders `messages`; with `add_generation_prompt` the text ends with the opening of an assistant
/// turn. InvalidArgument for a role the format does not have, or no messages.
absl::StatusOr<std::string> ApplyChatTemplate(ChatTemplateKind kind,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt);

}  // namespace specontext
