// GPT-2's reversible byte <-> printable code point map used by byte-level BPE (Llama 3, Qwen):
// printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in byte order.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace specontext::byte_level {

/// The code point that stands for `byte`.
char32_t ByteToChar(uint8_t byte);
/// The byte a code point stands for, or -1 when `cp` is not in the map.
int CharToByte(char32_t cp);
/// Maps every byte of `bytes` to its code point, UTF-8 encoded (e.g. " a" -> "Ġa").
std::string Encode(std::string_view bytes);
/// Inverse of Encode for a token string; false (and `out` untouched) when a code point is not in
/// the map or `token` is not valid UTF-8.
bool Decode(std::string_view token, std::string* out);

}  // namespace specontext::byte_level
