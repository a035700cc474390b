// Added tokens of tokenizer.json ("added_tokens"): found in the input before anything else runs, as
// HF's AddedVocabulary does (leftmost-longest matching, single_word / lstrip / rstrip).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"

namespace specontext {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;       // the match swallows white space on its left
  bool rstrip = false;       // ... and on its right
  bool single_word = false;  // only matches when not inside a word
  bool normalized = false;   // matched on normalized text (else on the raw input)
};

/// A part of the input: an added token (`token` >= 0: index into the matcher's tokens) or plain
/// text.
struct TextSegment {
  int token = -1;
  size_t start = 0, end = 0;  // byte range in the input
};

class AddedTokenMatcher {
 public:
  /// Matches the tokens whose `normalized` flag equals `normalized`. `match_texts[i]` is what token
  /// i looks like in the text searched (HF runs the normalizer over the content of normalized
  /// tokens); empty vector = the contents as they are. `tokens` must outlive the matcher.
  AddedTokenMatcher(const std::vector<AddedToken>* tokens, bool normalized,
                    const std::vector<std::string>& match_texts = {});
  /// Matches the tokens `include` accepts, spelled as their contents.
  AddedTokenMatcher(const std::vector<AddedToken>* tokens,
                    absl::FunctionRef<bool(const AddedToken&)> include);
  /// Splits `text` into plain-text and added-token segments covering it (empty text segments are
  /// left out).
  std::vector<TextSegment> Split(std::string_view text) const;
  /// Whether token `token` may match text[start, end).
  using MatchFilter = absl::FunctionRef<bool(int token, size_t start, size_t end)>;
  /// Same, where a match `allow` refuses counts as not there (a shorter allowed token at the same
  /// place may match instead).
  std::vector<TextSegment> Split(std::string_view text, MatchFilter allow) const;
  bool empty() const { return nodes_.size() == 1; }

 private:
  // Longest token starting at `pos`: its index, or -1; `len` gets its length.
  int LongestAt(std::string_view text, size_t pos, MatchFilter allow, size_t* len) const;
  void Add(int index, std::string_view text);

  struct Node {
    absl::flat_hash_map<unsigned char, int32_t> next;
    int token = -1;
  };
  const std::vector<AddedToken>* tokens_;
  std::vector<Node> nodes_;
};

}  // namespace specontext
