#include "core/tokenizer/hf_common.h"

#include <utf8proc.h>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/tokenizer/utf8.h"

namespace specontext {

using nlohmann::json;

absl::StatusOr<std::string> ComponentType(const json& j, std::string_view what) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(what), " must be an object or null"));
  }
  const auto it = j.find("type");
  if (it == j.end() || !it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), " has no string 'type'"));
  }
  return it->get<std::string>();
}

absl::StatusOr<std::string> GetString(const json& j, const char* key, std::string_view what) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(what), ": '", key, "' must be a string"));
  }
  return it->get<std::string>();
}

absl::StatusOr<bool> GetBool(const json& j, const char* key, bool fallback, std::string_view what) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(what), ": '", key, "' must be a boolean"));
  }
  return it->get<bool>();
}

absl::StatusOr<int64_t> GetInt(const json& j, const char* key, int64_t fallback, int64_t lo,
                               int64_t hi, std::string_view what) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number_integer() || it->get<int64_t>() < lo || it->get<int64_t>() > hi) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": '", key,
                                                   "' must be an integer in [", lo, ", ", hi, "]"));
  }
  return it->get<int64_t>();
}

std::unique_ptr<Pattern> Pattern::Literal(std::string s) {
  auto p = std::make_unique<Pattern>();
  p->literal_ = std::move(s);
  return p;
}

absl::StatusOr<std::unique_ptr<Pattern>> Pattern::FromRegex(std::string_view re) {
  auto p = std::make_unique<Pattern>();
  ASSIGN_OR_RETURN(p->regex_, Regex::Compile(re));
  return p;
}

absl::Status Pattern::FindAll(std::string_view text,
                              std::vector<std::pair<size_t, size_t>>* out) const {
  if (regex_) return regex_->FindAll(text, out);
  if (literal_.empty()) return absl::OkStatus();  // an empty literal never splits (as in HF)
  for (size_t pos = text.find(literal_); pos != std::string_view::npos;
       pos = text.find(literal_, pos + literal_.size())) {
    out->emplace_back(pos, pos + literal_.size());
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Pattern>> MakePattern(const json& j, std::string_view what) {
  const auto it = j.find("pattern");
  if (it == j.end() || !it->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(what), ": 'pattern' must be an object"));
  }
  if (const auto s = it->find("String"); s != it->end() && s->is_string()) {
    return Pattern::Literal(s->get<std::string>());
  }
  if (const auto r = it->find("Regex"); r != it->end() && r->is_string()) {
    auto p = Pattern::FromRegex(r->get_ref<const std::string&>());
    if (!p.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(what), ": ", p.status().message()));
    }
    return p;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(std::string(what), ": 'pattern' needs a string 'String' or 'Regex'"));
}

bool IsWhiteSpace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

bool IsWordChar(char32_t cp) {
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

size_t SkipWhiteSpace(std::string_view s, size_t from) {
  size_t i = from;
  while (i < s.size()) {
    const size_t n = utf8::ValidSequenceLength(s, i);
    if (n == 0 || !IsWhiteSpace(utf8::DecodeAt(s, i, n))) break;
    i += n;
  }
  return i;
}

size_t WhiteSpaceSuffixStart(std::string_view s) {
  size_t i = s.size();
  while (i > 0) {
    size_t b = i - 1;
    while (b > 0 && (static_cast<uint8_t>(s[b]) & 0xC0) == 0x80 && i - b < 4) --b;
    const size_t n = utf8::ValidSequenceLength(s, b);
    if (n != i - b || !IsWhiteSpace(utf8::DecodeAt(s, b, n))) break;
    i = b;
  }
  return i;
}

}  // namespace specontext
