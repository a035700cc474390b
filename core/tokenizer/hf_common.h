// Helpers shared by the tokenizer.json stages: typed JSON field access with clear errors, Split /
// Replace patterns ({"String": ...} or {"Regex": ...}), and the Unicode character classes HF uses.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tokenizer/regex.h"
#include "nlohmann/json.hpp"

namespace specontext {

/// j["type"] as a string; `what` names the component in errors ("normalizer", "decoder", ...).
absl::StatusOr<std::string> ComponentType(const nlohmann::json& j, std::string_view what);
/// Required string field.
absl::StatusOr<std::string> GetString(const nlohmann::json& j, const char* key,
                                      std::string_view what);
/// Optional boolean field (absent or null -> `fallback`).
absl::StatusOr<bool> GetBool(const nlohmann::json& j, const char* key, bool fallback,
                             std::string_view what);
/// Optional integer field in [lo, hi] (absent or null -> `fallback`).
absl::StatusOr<int64_t> GetInt(const nlohmann::json& j, const char* key, int64_t fallback,
                               int64_t lo, int64_t hi, std::string_view what);

/// A literal string or a regex; both report non-overlapping matches left to right.
class Pattern {
 public:
  static std::unique_ptr<Pattern> Literal(std::string s);
  static absl::StatusOr<std::unique_ptr<Pattern>> FromRegex(std::string_view re);
  absl::Status FindAll(std::string_view text, std::vector<std::pair<size_t, size_t>>* out) const;

 private:
  std::string literal_;
  std::unique_ptr<Regex> regex_;
};

/// Builds j["pattern"] ({"String": s} or {"Regex": r}).
absl::StatusOr<std::unique_ptr<Pattern>> MakePattern(const nlohmann::json& j,
                                                     std::string_view what);

/// Unicode White_Space (Rust's char::is_whitespace).
bool IsWhiteSpace(char32_t cp);
/// Word character as regex \w: letters, marks, decimal digits, connector punctuation.
bool IsWordChar(char32_t cp);
/// First byte offset >= `from` that is not white space.
size_t SkipWhiteSpace(std::string_view s, size_t from);
/// Start of the trailing white-space run of `s`.
size_t WhiteSpaceSuffixStart(std::string_view s);

}  // namespace specontext
