// Pieces of the GGUF tokenizer conversion (gguf_vocab.cc), apart so each stays one concern:
// the pre-tokenizer table (gguf_pre_tokenizers.cc) and the SentencePiece merge rebuild
// (gguf_spm_merges.cc).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace specontext::gguf_vocab {

/// The text stages of the HF tokenizer.json a byte-level ("gpt2") GGUF vocabulary came from, chosen
/// by tokenizer.ggml.pre, and the flags llama.cpp sets with that name.
struct BytePipeline {
  nlohmann::json normalizer;     // null = none
  nlohmann::json pre_tokenizer;  // a tokenizer.json pre_tokenizer object
  bool ignore_merges = false;    // the original BPE model's ignore_merges
  bool add_bos = false;          // llama.cpp's add_bos default for this name
};

/// The pipeline for `pre` ("" and "default" = GPT-2's). Unimplemented naming `pre` and the names
/// supported when this engine cannot reproduce that family's pre-tokenizer exactly.
absl::StatusOr<BytePipeline> BytePipelineFor(std::string_view pre);

/// The supported tokenizer.ggml.pre names, comma-separated (for messages and docs).
std::string SupportedPreNames();

/// Merges of a SentencePiece BPE vocabulary rebuilt from its pieces and scores the way HF's GGUF
/// and SentencePiece converters do (transformers' generate_merges with scores): every split of
/// every piece into two pieces of the vocabulary, best piece score first; for equal scores the
/// longer left part, then the longer right part (lengths in code points), then piece id order,
/// then (left id, right id). A duplicated piece counts once, at its first position, with the
/// score and id of its last occurrence (Python dict semantics, as in HF). Pieces must be valid
/// UTF-8 and scores finite; the work is the sum over pieces of their length squared, so callers
/// bound piece lengths. Returns (left, right) piece pairs, best first.
std::vector<std::pair<std::string_view, std::string_view>> SentencePieceMerges(
    const std::vector<std::string>& pieces, const std::vector<float>& scores);

}  // namespace specontext::gguf_vocab
