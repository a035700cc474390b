// GGUF tokenizer metadata -> HF tokenizer.json / tokenizer_config.json texts (see gguf_vocab.h).
// Token types are llama.cpp's (llama_token_type): 0 undefined, 1 normal, 2 unknown, 3 control,
// 4 user-defined, 5 unused, 6 byte. Defaults when a key is absent are llama.cpp's
// (llama_vocab::impl::load): a "llama" vocabulary gets BOS 1, EOS 2, UNK 0, add_bos true and
// add_space_prefix true; a "gpt2" one adds BOS only for the names whose family does (Llama 3,
// Tekken).
#include "core/io/gguf_vocab.h"

#include <cmath>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "core/io/gguf_vocab_internal.h"
#include "core/status_macros.h"
#include "core/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using nlohmann::json;

// More tokens than this are refused (our BPE model's id limit; no real vocabulary comes close).
constexpr size_t kMaxTokens = size_t{1} << 24;
// SentencePiece pieces longer than this are refused: rebuilding merges costs the square of a
// piece's length (SentencePiece's own limit is 16 characters by default).
constexpr size_t kMaxPieceBytes = 1024;

enum TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

constexpr char kMetaspace[] = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// The checked vocabulary: token texts (empty ones renamed as llama.cpp does, "[EMPTY_<id>]") and
// text -> id of its last occurrence (llama.cpp's token_to_id and HF's dict both keep the last).
struct Vocab {
  std::vector<std::string> tokens;
  absl::flat_hash_map<std::string_view, int32_t> id_of;
  int32_t Type(const GgufVocab& v, size_t i) const {
    return v.token_types.empty() ? kNormal : v.token_types[i];
  }
};

absl::Status CheckId(int64_t id, size_t n, const char* key) {
  if (id < -1 || id >= static_cast<int64_t>(n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tokenizer: ", key, " ", id, " is out of range (", n, " tokens)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Vocab> CheckVocab(const GgufVocab& v) {
  const size_t n = v.tokens.size();
  if (n == 0) return absl::InvalidArgumentError("GGUF tokenizer: empty vocabulary");
  if (n > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tokenizer: ", n, " tokens; at most ", kMaxTokens, " are supported"));
  }
  if (!v.token_types.empty() && v.token_types.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tokenizer: ", v.token_types.size(), " token types for ", n, " tokens"));
  }
  if (!v.scores.empty() && v.scores.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tokenizer: ", v.scores.size(), " scores for ", n, " tokens"));
  }
  for (size_t i = 0; i < v.token_types.size(); ++i) {
    if (v.token_types[i] < kUndefined || v.token_types[i] > kByte) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF tokenizer: token ", i, " has unknown type ", v.token_types[i]));
    }
  }
  for (size_t i = 0; i < v.scores.size(); ++i) {
    if (!std::isfinite(v.scores[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF tokenizer: score of token ", i, " is not finite"));
    }
  }
  RETURN_IF_ERROR(CheckId(v.bos_id, n, "bos_token_id"));
  RETURN_IF_ERROR(CheckId(v.eos_id, n, "eos_token_id"));
  RETURN_IF_ERROR(CheckId(v.unk_id, n, "unknown_token_id"));
  RETURN_IF_ERROR(CheckId(v.pad_id, n, "padding_token_id"));
  RETURN_IF_ERROR(CheckId(v.eot_id, n, "eot_token_id"));
  if (!utf8::IsValid(v.chat_template)) {
    return absl::InvalidArgumentError("GGUF tokenizer: chat_template is not valid UTF-8");
  }
  Vocab out;
  out.tokens.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (!utf8::IsValid(v.tokens[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF tokenizer: token ", i, " is not valid UTF-8"));
    }
    out.tokens.push_back(v.tokens[i].empty() ? absl::StrCat("[EMPTY_", i, "]") : v.tokens[i]);
  }
  out.id_of.reserve(n);
  for (size_t i = 0; i < n; ++i) out.id_of[out.tokens[i]] = static_cast<int32_t>(i);
  return out;
}

// Tokens matched whole in the text before the model runs, as HF added tokens: control (and, for
// SentencePiece, unknown: llama.cpp partitions on both) become special, user-defined ones plain
// added tokens (HF's `special: false`, e.g. Qwen's <think>). Of duplicated texts only the id the
// text resolves to is added.
json AddedTokens(const GgufVocab& v, const Vocab& vocab, bool unknown_is_special) {
  json out = json::array();
  for (size_t i = 0; i < vocab.tokens.size(); ++i) {
    const int32_t type = vocab.Type(v, i);
    const bool special = type == kControl || (unknown_is_special && type == kUnknown);
    if (!special && type != kUserDefined) continue;
    if (vocab.id_of.at(vocab.tokens[i]) != static_cast<int32_t>(i)) continue;
    out.push_back({{"id", i},
                   {"content", vocab.tokens[i]},
                   {"single_word", false},
                   {"lstrip", false},
                   {"rstrip", false},
                   {"normalized", false},
                   {"special", special}});
  }
  return out;
}

json VocabObject(const Vocab& vocab) {
  json out = json::object();
  for (size_t i = 0; i < vocab.tokens.size(); ++i) out[vocab.tokens[i]] = i;  // last one wins
  return out;
}

json BpeModel(json vocab, json merges, const std::string* unk, bool byte_fallback,
              bool ignore_merges) {
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", unk != nullptr ? json(*unk) : json(nullptr)},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", byte_fallback},
          {"byte_fallback", byte_fallback},
          {"ignore_merges", ignore_merges},
          {"vocab", std::move(vocab)},
          {"merges", std::move(merges)}};
}

// Byte-level BPE ("gpt2"): the file's merges, checked part by part.
absl::StatusOr<json> ByteLevelTokenizer(const GgufVocab& v, const Vocab& vocab) {
  ASSIGN_OR_RETURN(const gguf_vocab::BytePipeline pipe, gguf_vocab::BytePipelineFor(v.pre));
  if (v.merges.empty()) {
    return absl::InvalidArgumentError(
        "GGUF tokenizer: a gpt2 vocabulary needs tokenizer.ggml.merges");
  }
  json merges = json::array();
  std::string merged;
  for (size_t i = 0; i < v.merges.size(); ++i) {
    const std::string& m = v.merges[i];
    const size_t sp = m.find(' ');
    if (sp == 0 || sp == std::string::npos || sp + 1 == m.size() ||
        m.find(' ', sp + 1) != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF tokenizer: merge ", i, " is not two tokens split by one space"));
    }
    const std::string_view a = std::string_view(m).substr(0, sp),
                           b = std::string_view(m).substr(sp + 1);
    merged.assign(a);
    merged.append(b);
    if (!vocab.id_of.contains(a) || !vocab.id_of.contains(b) || !vocab.id_of.contains(merged)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF tokenizer: merge ", i, " uses or makes a token not in the vocabulary"));
    }
    merges.push_back(m);
  }
  json root = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}};
  root["added_tokens"] = AddedTokens(v, vocab, /*unknown_is_special=*/false);
  root["normalizer"] = pipe.normalizer;
  root["pre_tokenizer"] = pipe.pre_tokenizer;
  root["post_processor"] = nullptr;
  root["decoder"] = {{"type", "ByteLevel"},
                     {"add_prefix_space", true},
                     {"trim_offsets", true},
                     {"use_regex", true}};
  // No unk: every byte has a token, and HF's byte-level files name none.
  root["model"] =
      BpeModel(VocabObject(vocab), std::move(merges), nullptr, false, pipe.ignore_merges);
  return root;
}

// SentencePiece BPE ("llama"), as HF's Llama tokenizer.json: the space prefix and
// space -> U+2581 as normalizers (Prepend + Replace: SentencePiece and llama.cpp prefix every
// text run, also after a special token and also when it already starts with a space), byte
// fallback to the <0xXX> tokens, merges rebuilt from the scores.
absl::StatusOr<json> SentencePieceTokenizer(const GgufVocab& v, const Vocab& vocab, int64_t unk_id,
                                            bool add_space_prefix) {
  if (v.scores.empty()) {
    return absl::InvalidArgumentError(
        "GGUF tokenizer: a llama vocabulary needs tokenizer.ggml.scores");
  }
  for (size_t i = 0; i < vocab.tokens.size(); ++i) {
    if (vocab.tokens[i].size() > kMaxPieceBytes) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF tokenizer: token ", i, " is ",
                                                     vocab.tokens[i].size(), " bytes; at most ",
                                                     kMaxPieceBytes, " are supported"));
    }
  }
  json merges = json::array();
  for (const auto& [a, b] : gguf_vocab::SentencePieceMerges(vocab.tokens, v.scores)) {
    merges.push_back(json::array({std::string(a), std::string(b)}));
  }
  const json replace = {
      {"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMetaspace}};
  json normalizers = json::array();
  if (add_space_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", kMetaspace}});
  normalizers.push_back(replace);
  json decoders =
      json::array({{{"type", "Replace"}, {"pattern", {{"String", kMetaspace}}}, {"content", " "}},
                   {{"type", "ByteFallback"}},
                   {{"type", "Fuse"}}});
  if (add_space_prefix) {
    decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  }
  json root = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}};
  root["added_tokens"] = AddedTokens(v, vocab, /*unknown_is_special=*/true);
  root["normalizer"] = {{"type", "Sequence"}, {"normalizers", std::move(normalizers)}};
  root["pre_tokenizer"] = nullptr;
  root["post_processor"] = nullptr;
  root["decoder"] = {{"type", "Sequence"}, {"decoders", std::move(decoders)}};
  const std::string* unk = unk_id >= 0 ? &vocab.tokens[static_cast<size_t>(unk_id)] : nullptr;
  root["model"] = BpeModel(VocabObject(vocab), std::move(merges), unk, /*byte_fallback=*/true,
                           /*ignore_merges=*/false);
  return root;
}

}  // namespace

absl::StatusOr<HfTokenizerTexts> HfTokenizerFromGguf(const GgufVocab& v) {
  if (v.model.empty()) {
    return absl::InvalidArgumentError("GGUF tokenizer: tokenizer.ggml.model is missing");
  }
  if (v.model != "gpt2" && v.model != "llama") {
    return absl::UnimplementedError(absl::StrCat("GGUF tokenizer model '", v.model,
                                                 "' is not supported; supported: gpt2, llama"));
  }
  ASSIGN_OR_RETURN(const Vocab vocab, CheckVocab(v));
  const bool spm = v.model == "llama";
  const size_t n = vocab.tokens.size();
  auto or_default = [&](int64_t id, int64_t spm_default) {
    if (id >= 0 || !spm) return id;
    return spm_default < static_cast<int64_t>(n) ? spm_default : int64_t{-1};
  };
  const int64_t bos = or_default(v.bos_id, 1), eos = or_default(v.eos_id, 2),
                unk = or_default(v.unk_id, 0);
  json root;
  bool add_bos = true;
  if (spm) {
    ASSIGN_OR_RETURN(root,
                     SentencePieceTokenizer(v, vocab, unk, v.add_space_prefix.value_or(true)));
  } else {
    ASSIGN_OR_RETURN(root, ByteLevelTokenizer(v, vocab));
    add_bos = gguf_vocab::BytePipelineFor(v.pre)->add_bos;
  }
  auto token = [&](int64_t id) {
    return id >= 0 ? json(vocab.tokens[static_cast<size_t>(id)]) : json(nullptr);
  };
  json config = {{"bos_token", token(bos)},
                 {"eos_token", token(eos)},
                 {"unk_token", token(unk)},
                 {"pad_token", token(v.pad_id)},
                 {"add_bos_token", v.add_bos.value_or(add_bos)},
                 {"add_eos_token", v.add_eos.value_or(false)}};
  // The end-of-turn token ends generation too (Tokenizer::eos_ids).
  if (v.eot_id >= 0 && v.eot_id != eos)
    config["end_of_turn_tokens"] = json::array({token(v.eot_id)});
  if (!v.chat_template.empty()) config["chat_template"] = v.chat_template;
  HfTokenizerTexts out;
  out.tokenizer_json = root.dump();
  out.tokenizer_config_json = config.dump();
  return out;
}

}  // namespace specontext
