#include "core/tokenizer/utf8.h"

namespace specontext::utf8 {
namespace {

// Number of bytes a lead byte announces and the allowed range of its first continuation byte
// (Unicode Table 3-7); 0 for bytes that cannot start a sequence.
struct Lead {
  size_t len;
  uint8_t lo, hi;
};

Lead LeadInfo(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

// How many bytes from s[i] form a valid (possibly incomplete) prefix of a sequence, and the length
// that sequence would need.
size_t ValidPrefix(std::string_view s, size_t i, size_t* need) {
  const Lead lead = LeadInfo(static_cast<uint8_t>(s[i]));
  *need = lead.len;
  if (lead.len <= 1) return lead.len;
  size_t k = 1;
  for (; k < lead.len && i + k < s.size(); ++k) {
    const uint8_t c = static_cast<uint8_t>(s[i + k]);
    const uint8_t lo = k == 1 ? lead.lo : 0x80;
    const uint8_t hi = k == 1 ? lead.hi : 0xBF;
    if (c < lo || c > hi) break;
  }
  return k;
}

}  // namespace

size_t ValidSequenceLength(std::string_view s, size_t i) {
  size_t need = 0;
  const size_t got = ValidPrefix(s, i, &need);
  return got == need ? need : 0;
}

size_t MaximalSubpartLength(std::string_view s, size_t i) {
  size_t need = 0;
  const size_t got = ValidPrefix(s, i, &need);
  return got == 0 ? 1 : got;
}

bool IsValid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = ValidSequenceLength(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string Sanitize(std::string_view s) {
  if (IsValid(s)) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    const size_t n = ValidSequenceLength(s, i);
    if (n > 0) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      Append(kReplacement, &out);
      i += MaximalSubpartLength(s, i);
    }
  }
  return out;
}

char32_t DecodeAt(std::string_view s, size_t i, size_t len) {
  const auto b = [&](size_t k) { return static_cast<char32_t>(static_cast<uint8_t>(s[i + k])); };
  switch (len) {
    case 1:
      return b(0);
    case 2:
      return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3:
      return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default:
      return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

void Append(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t CompletePrefixLength(std::string_view s) {
  // Only a lead byte among the last three can begin a sequence still waiting for bytes. A lead byte
  // is never consumed by an earlier (maximal-subpart) sequence, so cutting before it decodes the
  // same as decoding the whole.
  const size_t start = s.size() > 3 ? s.size() - 3 : 0;
  for (size_t i = s.size(); i-- > start;) {
    const uint8_t b = static_cast<uint8_t>(s[i]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: keep looking for its lead
    size_t need = 0;
    const size_t got = ValidPrefix(s, i, &need);
    if (need > 1 && got == s.size() - i && got < need) return i;  // truncated, still valid
    return s.size();
  }
  return s.size();
}

}  // namespace specontext::utf8
