// A compiled PCRE2 pattern (UTF + UCP, JIT when available) for the pre-tokenizers' Split rules.
// HF `tokenizers` uses Oniguruma; the patterns of real tokenizer.json files (\p{L}, \p{N}, \s,
// (?i:), lookahead) mean the same in PCRE2 with UCP.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext {

class Regex {
 public:
  /// Compiles `pattern`; InvalidArgument with PCRE2's message and offset on a syntax error.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  /// Byte ranges [start, end) of all non-overlapping matches in `text` (valid UTF-8), left to
  /// right. After an empty match the search resumes one code point later. Thread-safe.
  absl::Status FindAll(std::string_view text,
                       std::vector<std::pair<size_t, size_t>>* matches) const;

 private:
  Regex() = default;
  void* code_ = nullptr;  // pcre2_code*
};

}  // namespace specontext
