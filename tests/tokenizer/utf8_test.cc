// UTF-8 helpers: lossy decoding must equal Python's bytes.decode('utf-8', errors='replace').
#include "core/tokenizer/utf8.h"

#include <random>

#include "gtest/gtest.h"

namespace specontext {
namespace {

const std::string kFffd = "\xEF\xBF\xBD";

TEST(Utf8Test, SanitizeMatchesPythonReplace) {
  // Expected values are what CPython 3 prints for b'...'.decode('utf-8', 'replace').
  EXPECT_EQ(utf8::Sanitize("abc"), "abc");
  EXPECT_EQ(utf8::Sanitize("\xC3\x28"), kFffd + "(");
  EXPECT_EQ(utf8::Sanitize("\xE2\x82\x28"), kFffd + "(");            // one U+FFFD for E2 82
  EXPECT_EQ(utf8::Sanitize("\xF0\x9F\x98"), kFffd);                  // truncated emoji
  EXPECT_EQ(utf8::Sanitize("\xED\xA0\x80"), kFffd + kFffd + kFffd);  // surrogate
  EXPECT_EQ(utf8::Sanitize("\xC0\xAF"), kFffd + kFffd);              // overlong
  EXPECT_EQ(utf8::Sanitize("\xE0\x80\x80"), kFffd + kFffd + kFffd);  // overlong
  EXPECT_EQ(utf8::Sanitize("\xF4\x90\x80\x80"), kFffd + kFffd + kFffd + kFffd);  // > U+10FFFF
  EXPECT_EQ(utf8::Sanitize("\xF5\x80"), kFffd + kFffd);
  EXPECT_EQ(utf8::Sanitize(std::string("a\0\xFF"
                                       "b",
                                       4)),
            std::string("a\0", 2) + kFffd + "b");
  EXPECT_EQ(utf8::Sanitize("\xE6\x97\xA5\xE6\x9C"), "\xE6\x97\xA5" + kFffd);
}

TEST(Utf8Test, RandomBytesSanitizeToValidAndValidIsUnchanged) {
  std::mt19937 rng(std::random_device{}());
  for (int iter = 0; iter < 2000; ++iter) {
    std::string s(rng() % 24, '\0');
    for (char& c : s) c = static_cast<char>(rng() % 4 == 0 ? 0x80 + rng() % 0x80 : rng() % 256);
    const std::string clean = utf8::Sanitize(s);
    ASSERT_TRUE(utf8::IsValid(clean));
    ASSERT_EQ(utf8::Sanitize(clean), clean);
  }
}

TEST(Utf8Test, CompletePrefixCutsOnlyBeforePendingSequences) {
  EXPECT_EQ(utf8::CompletePrefixLength("ab\xF0\x9F"), 2u);
  EXPECT_EQ(utf8::CompletePrefixLength("ab\xF0\x9F\x98\x80"), 6u);
  EXPECT_EQ(utf8::CompletePrefixLength("ab\xE2"), 2u);
  EXPECT_EQ(utf8::CompletePrefixLength("ab\xFF"), 3u);      // can never complete: emit (as U+FFFD)
  EXPECT_EQ(utf8::CompletePrefixLength("ab\xE2\x28"), 4u);  // already broken
  // Cutting at the returned point and decoding both halves equals decoding the whole.
  std::mt19937 rng(std::random_device{}());
  for (int iter = 0; iter < 5000; ++iter) {
    std::string s(1 + rng() % 12, '\0');
    for (char& c : s)
      c = static_cast<char>(rng() % 3 == 0 ? 0x80 + rng() % 0x40 : 0xC0 + rng() % 0x40);
    const size_t k = rng() % (s.size() + 1);
    const std::string head = s.substr(0, k);
    const size_t cut = utf8::CompletePrefixLength(head);
    ASSERT_EQ(utf8::Sanitize(head.substr(0, cut)) + utf8::Sanitize(s.substr(cut)),
              utf8::Sanitize(s));
  }
}

}  // namespace
}  // namespace specontext
