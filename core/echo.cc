#include "core/echo.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace specontext {
namespace {

// The longest prefix of `text` of at most `max_bytes` bytes that does not end inside a UTF-8
// sequence (a cut multi-byte character would make the echo invalid UTF-8, which protobuf strings
// and log readers reject).
absl::string_view Utf8Prefix(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  size_t end = max_bytes;
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  return text.substr(0, end);
}

}  // namespace

std::string TruncateForEcho(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return std::string(text);
  return absl::StrCat(Utf8Prefix(text, max_bytes), "... (", text.size(), " bytes)");
}

std::string EchoValue(absl::string_view value, size_t max_bytes) {
  const absl::string_view kept = Utf8Prefix(value, max_bytes);
  std::string out = absl::StrCat("\"", absl::Utf8SafeCHexEscape(kept), "\"");
  if (kept.size() < value.size()) absl::StrAppend(&out, "... (", value.size(), " bytes)");
  return out;
}

}  // namespace specontext
