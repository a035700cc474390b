// UTF-8 helpers shared by the tokenizers: lossy decoding exactly like Python's
// bytes.decode('utf-8', errors='replace') / Rust's String::from_utf8_lossy (one U+FFFD per maximal
// subpart of an ill-formed sequence), code point iteration and the streaming cut point.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace specontext::utf8 {

inline constexpr char32_t kReplacement = 0xFFFD;

/// Length of the well-formed UTF-8 sequence starting at s[i], or 0 when s[i..] does not start with
/// one (an ill-formed or truncated sequence). Follows Unicode Table 3-7 (no overlongs, no
/// surrogates, nothing above U+10FFFF).
size_t ValidSequenceLength(std::string_view s, size_t i);

/// Length of the maximal subpart at s[i] when no well-formed sequence starts there: how many bytes
/// one U+FFFD replaces (always >= 1).
size_t MaximalSubpartLength(std::string_view s, size_t i);

/// True when `s` is entirely well-formed UTF-8.
bool IsValid(std::string_view s);

/// Returns `s` with every ill-formed subpart replaced by U+FFFD (maximal-subpart policy, like
/// Python's errors='replace'). Valid input is returned unchanged.
std::string Sanitize(std::string_view s);

/// Decodes the well-formed sequence of length `len` at s[i] (caller checked it).
char32_t DecodeAt(std::string_view s, size_t i, size_t len);

/// Appends the UTF-8 encoding of `cp` (cp <= 0x10FFFF, not a surrogate).
void Append(char32_t cp, std::string* out);

/// For streaming: the length of the longest prefix of `s` that can be emitted now. The rest (at
/// most 3 bytes) is a truncated-but-so-far-valid sequence that more bytes could still complete.
size_t CompletePrefixLength(std::string_view s);

}  // namespace specontext::utf8
