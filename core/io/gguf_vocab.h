// The tokenizer a GGUF file carries (its tokenizer.ggml.* and tokenizer.chat_template metadata),
// converted to the HF tokenizer.json / tokenizer_config.json texts that ParseHfTokenizer reads, so a
// GGUF model tokenizes through the same pipeline as an HF directory.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext {

/// The tokenizer keys of a GGUF file, as read (llama.cpp's names in the comments).
struct GgufVocab {
  std::string model;  // tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
  std::string pre;    // tokenizer.ggml.pre: pre-tokenizer name ("llama-bpe", "qwen2", "smollm", ...); "" = default
  std::vector<std::string> tokens;   // tokenizer.ggml.tokens, id order
  std::vector<int32_t> token_types;  // tokenizer.ggml.token_type (1 normal, 2 unknown, 3 control,
                                     // 4 user-defined, 5 unused, 6 byte); empty when absent
  std::vector<float> scores;         // tokenizer.ggml.scores; empty when absent
  std::vector<std::string> merges;   // tokenizer.ggml.merges ("a b"); gpt2 only
  int64_t bos_id = -1;               // tokenizer.ggml.bos_token_id
  int64_t eos_id = -1;               // tokenizer.ggml.eos_token_id
  int64_t unk_id = -1;               // tokenizer.ggml.unknown_token_id
  int64_t pad_id = -1;               // tokenizer.ggml.padding_token_id
  int64_t eot_id = -1;               // tokenizer.ggml.eot_token_id
  std::optional<bool> add_bos;       // tokenizer.ggml.add_bos_token
  std::optional<bool> add_eos;       // tokenizer.ggml.add_eos_token
  std::optional<bool> add_space_prefix;  // tokenizer.ggml.add_space_prefix (llama)
  std::string chat_template;         // tokenizer.chat_template; "" when absent
};

/// tokenizer.json and tokenizer_config.json texts equivalent to a GGUF vocabulary.
struct HfTokenizerTexts {
  std::string tokenizer_json;
  std::string tokenizer_config_json;  // bos_token, eos_token, add_bos_token, chat_template
};

/// Converts `vocab`. InvalidArgument naming the problem for an inconsistent vocabulary (ids out of
/// range, a merge of unknown tokens, ...); Unimplemented naming the tokenizer model or pre-tokenizer
/// when it is one this engine cannot reproduce.
absl::StatusOr<HfTokenizerTexts> HfTokenizerFromGguf(const GgufVocab& vocab);

}  // namespace specontext
