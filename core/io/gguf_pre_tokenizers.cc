// tokenizer.ggml.pre -> the normalizer and pre-tokenizer of the HF tokenizer.json that vocabulary
// was converted from. llama.cpp's convert_hf_to_gguf.py names a tokenizer by hashing its output
// on a test text (get_vocab_base_pre), and src/llama-vocab.cpp maps each name to a pre-tokenizer
// type with regexes adapted to its own regex engine. We go back to the original HF stages (which
// our tokenizer.json pipeline runs as HF does) for the families whose tokenizer.json we know:
//  - Llama 3 ("llama-bpe"): Split on the cl100k-style regex (\p{N}{1,3}), ByteLevel without
//    regex, ignore_merges; llama.cpp also adds BOS by default for this name.
//  - Qwen2/2.5/3 and the DeepSeek-R1 Qwen distills ("qwen2", "deepseek-r1-qwen"): NFC, the same
//    Split with single digits (\p{N}), ByteLevel without regex.
//  - SmolLM/SmolLM2, StarCoder, Refact ("smollm", "starcoder", "refact"): Digits with
//    individual_digits, then ByteLevel with GPT-2's regex (llama.cpp: "\p{N}" then the GPT-2
//    regex).
//  - GPT-2 and Phi-2 ("gpt-2", "phi-2", "default", or no name): ByteLevel with GPT-2's regex.
//  - DeepSeek Coder / V3 ("deepseek-coder", "deepseek-v3"): the Split sequence llama.cpp lists
//    for them (taken from their tokenizer.json; \p{N} there is HF Digits), then ByteLevel without
//    regex. (DeepSeek LLM's letter class could not be reproduced code point for code point here,
//    so "deepseek-llm" is refused.)
//  - Mistral Nemo's Tekken ("tekken"): Split on the regex llama.cpp quotes from tokenizer.json,
//    ByteLevel without regex, ignore_merges; BOS by default.
// Other names (falcon, mpt, command-r, chatglm, bloom, gpt-4o, ...) are refused: a guessed
// pipeline would tokenize differently from the model's own tokenizer without saying so.
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/io/gguf_vocab_internal.h"

namespace specontext::gguf_vocab {
namespace {

using nlohmann::json;

json Split(std::string_view regex) {
  return {{"type", "Split"},
          {"pattern", {{"Regex", std::string(regex)}}},
          {"behavior", "Isolated"},
          {"invert", false}};
}
json Digits(bool individual) { return {{"type", "Digits"}, {"individual_digits", individual}}; }
json ByteLevel(bool use_regex) {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", false},
          {"trim_offsets", true},
          {"use_regex", use_regex}};
}
json Sequence(std::initializer_list<json> steps) {
  return {{"type", "Sequence"}, {"pretokenizers", json::array_t(steps)}};
}

// Llama 3's tokenizer.json Split regex (also in llama-vocab.cpp's comment for LLAMA3).
constexpr char kLlama3Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Qwen2's: the same with single digits.
constexpr char kQwen2Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Tekken's tokenizer.json regex, as quoted in llama-vocab.cpp (LLAMA_VOCAB_PRE_TYPE_TEKKEN).
constexpr char kTekkenRegex[] =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// DeepSeek's CJK class (LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER).
constexpr char kDeepseekCjk[] = R"([一-龥ࠀ-一가-퟿]+)";
// DeepSeek V3 (LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM).
constexpr char kDeepseek3Main[] =
    R"([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct Family {
  std::initializer_list<std::string_view> names;
  BytePipeline (*make)();
};

BytePipeline Llama3() {
  return {nullptr, Sequence({Split(kLlama3Regex), ByteLevel(false)}), true, true};
}
BytePipeline Qwen2() {
  return {{{"type", "NFC"}}, Sequence({Split(kQwen2Regex), ByteLevel(false)}), false, false};
}
BytePipeline StarcoderDigits() {
  return {nullptr, Sequence({Digits(true), ByteLevel(true)}), false, false};
}
BytePipeline Gpt2() { return {nullptr, ByteLevel(true), false, false}; }
BytePipeline DeepseekCoder() {
  return {nullptr,
          Sequence({Split("[\r\n]"), Split(R"(\s?\p{L}+)"), Split(R"(\s?\p{P}+)"),
                    Split(kDeepseekCjk), Digits(true), ByteLevel(false)}),
          false, false};
}
BytePipeline Deepseek3() {
  return {nullptr,
          Sequence({Split(R"(\p{N}{1,3})"), Split("[一-龥぀-ゟ゠-ヿ]+"),
                    Split(kDeepseek3Main), ByteLevel(false)}),
          false, false};
}
BytePipeline Tekken() {
  return {nullptr, Sequence({Split(kTekkenRegex), ByteLevel(false)}), true, true};
}

const Family kFamilies[] = {
    {{"llama-bpe", "llama3", "llama-v3"}, Llama3},
    {{"qwen2", "deepseek-r1-qwen"}, Qwen2},
    {{"smollm", "starcoder", "refact"}, StarcoderDigits},
    {{"gpt-2", "phi-2", "default"}, Gpt2},
    {{"deepseek-coder"}, DeepseekCoder},
    {{"deepseek-v3"}, Deepseek3},
    {{"tekken"}, Tekken},
};

}  // namespace

std::string SupportedPreNames() {
  std::vector<std::string> names;
  for (const Family& f : kFamilies) {
    for (const std::string_view name : f.names) names.emplace_back(name);
  }
  return absl::StrJoin(names, ", ");
}

absl::StatusOr<BytePipeline> BytePipelineFor(std::string_view pre) {
  // No name: llama.cpp warns and falls back to its own "default" regexes, which match no HF
  // tokenizer; old converters wrote no name for GPT-2-style vocabularies, so we take GPT-2's.
  if (pre.empty()) return Gpt2();
  for (const Family& f : kFamilies) {
    for (const std::string_view name : f.names) {
      if (name == pre) return f.make();
    }
  }
  return absl::UnimplementedError(
      absl::StrCat("GGUF pre-tokenizer '", std::string(pre),
                   "' is not supported; supported: ", SupportedPreNames()));
}

}  // namespace specontext::gguf_vocab
