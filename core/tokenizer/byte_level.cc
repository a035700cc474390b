#include "core/tokenizer/byte_level.h"

#include <array>

#include "core/tokenizer/utf8.h"

namespace specontext::byte_level {
namespace {

struct Tables {
  std::array<char32_t, 256> to_char{};
  std::array<std::string, 256> to_utf8;
  std::array<int16_t, 324> to_byte{};  // every mapped code point is < 0x144
};

const Tables& GetTables() {
  static const Tables t = [] {
    Tables t;
    t.to_byte.fill(-1);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      t.to_char[b] = printable ? static_cast<char32_t>(b) : next++;
      t.to_byte[t.to_char[b]] = static_cast<int16_t>(b);
      utf8::Append(t.to_char[b], &t.to_utf8[b]);
    }
    return t;
  }();
  return t;
}

}  // namespace

char32_t ByteToChar(uint8_t byte) { return GetTables().to_char[byte]; }

int CharToByte(char32_t cp) {
  const auto& t = GetTables();
  return cp < t.to_byte.size() ? t.to_byte[cp] : -1;
}

std::string Encode(std::string_view bytes) {
  const auto& t = GetTables();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char c : bytes) out += t.to_utf8[static_cast<uint8_t>(c)];
  return out;
}

bool Decode(std::string_view token, std::string* out) {
  std::string bytes;
  bytes.reserve(token.size());
  for (size_t i = 0; i < token.size();) {
    const size_t n = utf8::ValidSequenceLength(token, i);
    if (n == 0) return false;
    const int b = CharToByte(utf8::DecodeAt(token, i, n));
    if (b < 0) return false;
    bytes.push_back(static_cast<char>(b));
    i += n;
  }
  *out += bytes;
  return true;
}

}  // namespace specontext::byte_level
