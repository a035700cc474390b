// The BPE model of HF tokenizer.json ("type": "BPE"): vocab, merges (either "a b" strings or [a, b]
// pairs), ignore_merges, byte_fallback, unk_token/fuse_unk, continuing_subword_prefix and
// end_of_word_suffix, behaving like HF `tokenizers`.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/tokenizer/string_map.h"
#include "nlohmann/json.hpp"

namespace specontext {

class BpeModel {
 public:
  /// Builds the model from the "model" object of tokenizer.json. Errors name the bad field.
  static absl::StatusOr<std::unique_ptr<BpeModel>> FromJson(const nlohmann::json& model);

  /// Appends the ids of one pre-tokenized word (as the vocabulary spells it, e.g. byte-level
  /// "Ġhello"). Merges are applied lowest rank first, leftmost first among equal ranks, as HF does.
  /// Results for words up to kMaxCachedWordBytes are cached.
  absl::Status Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  /// Vocabulary string of `id`, nullptr when the id is not in the vocabulary.
  const std::string* IdToToken(int32_t id) const;
  /// The most bytes of the model's input one id can stand for (the longest vocabulary string, at
  /// least one character); nullopt when characters can be dropped (no unk token and no fallback)
  /// or fused into one unk. `byte_level`: the input is byte-level text (every byte a character).
  std::optional<size_t> MaxInputBytesPerToken(bool byte_level) const;
  /// One past the largest vocabulary id.
  int32_t id_limit() const { return static_cast<int32_t>(id_to_token_.size()); }

  static constexpr size_t kMaxCachedWordBytes = 256;
  static constexpr size_t kMaxCacheEntries = 1 << 16;

 private:
  BpeModel() = default;
  // One merge: pair rank (lower merges first) and the id of the merged token.
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  absl::Status AddMerge(std::string_view a, std::string_view b, int32_t rank);
  // Splits `word` into initial symbols (ids with unk/byte-fallback handling), then merges.
  absl::Status MergeWord(std::string_view word, std::vector<int32_t>* ids) const;

  StringMap<int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::optional<std::string> unk_token_;
  std::string prefix_;  // continuing_subword_prefix ("" = none)
  std::string suffix_;  // end_of_word_suffix ("" = none)
  bool ignore_merges_ = false;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;

  mutable absl::Mutex cache_mu_;
  mutable StringMap<std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace specontext
