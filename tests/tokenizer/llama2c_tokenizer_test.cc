// llama2.c tokenizer (stories260K's tok512.bin).
#include <random>

#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/test_strings.h"

namespace specontext {
namespace {

std::unique_ptr<Tokenizer> Load() {
  auto tok = LoadLlama2cTokenizer(std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/tok512.bin");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

TEST(Llama2cTokenizerTest, OnceUponATimeRoundTrips) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 512);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_ids(), std::vector<int32_t>{2});
  auto ids = tok->Encode("Once upon a time", /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  ASSERT_GE(ids->size(), 2u);
  EXPECT_EQ((*ids)[0], 1);
  // Merges must have happened: far fewer tokens than the 17 characters (+ dummy prefix).
  EXPECT_LT(ids->size(), 12u);
  for (const int32_t id : *ids) EXPECT_TRUE(id >= 0 && id < 512);
  // The first real token carries the dummy-prefix space, which decoding after BOS removes.
  EXPECT_EQ(tok->TokenBytes((*ids)[1])[0], ' ');
  EXPECT_EQ(tok->Decode(*ids, /*skip_special=*/true), "Once upon a time");
  EXPECT_EQ(tok->Decode(*ids, /*skip_special=*/false), "\n<s>\nOnce upon a time");
}

TEST(Llama2cTokenizerTest, MergesPickTheBestScoringPair) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  // Every adjacent pair left after encoding must not be a vocabulary token (else it would merge).
  const std::vector<std::string> texts = {"Once upon a time, there was a little girl named Lily.",
                                          "She liked to play with her big red ball in the park."};
  for (const std::string& text : texts) {
    auto ids = tok->Encode(text, false);
    ASSERT_TRUE(ids.ok());
    for (size_t i = 0; i + 1 < ids->size(); ++i) {
      const std::string pair = tok->TokenBytes((*ids)[i]) + tok->TokenBytes((*ids)[i + 1]);
      EXPECT_FALSE(tok->TokenToId(pair).has_value()) << "unmerged pair '" << pair << "'";
    }
    EXPECT_EQ(tok->Decode(*ids, true), text);
  }
}

TEST(Llama2cTokenizerTest, ByteFallbackForUnknownCharacters) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("🐍", false);
  ASSERT_TRUE(ids.ok());
  // " " then the four bytes F0 9F 90 8D as <0xXX> tokens (byte + 3).
  EXPECT_EQ(*ids,
            (std::vector<int32_t>{*tok->TokenToId(" "), 0xF0 + 3, 0x9F + 3, 0x90 + 3, 0x8D + 3}));
  EXPECT_EQ(tok->TokenBytes(0xF0 + 3), "\xF0");
  EXPECT_EQ(tok->Decode(*ids, true), "🐍");
  auto empty = tok->Encode("", true);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, std::vector<int32_t>{1});
}

TEST(Llama2cTokenizerTest, RandomTextRoundTrips) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  const auto strings = testing::ReadTestStrings(SPECONTEXT_TOKENIZER_STRINGS);
  std::mt19937 rng(std::random_device{}());
  for (int iter = 0; iter < 100; ++iter) {
    const std::string& s = strings[rng() % strings.size()];
    std::string text = std::string("x") + s;  // a non-space start survives the prefix strip
    auto ids = tok->Encode(text, true);
    ASSERT_TRUE(ids.ok());
    // Decoding gives back the (sanitized) text.
    auto again = tok->Encode(tok->Decode(*ids, true), true);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*again, *ids) << text;
  }
}

TEST(Llama2cTokenizerTest, MalformedFilesAreRejected) {
  const std::string good =
      testing::ReadFile(std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/tok512.bin");
  ASSERT_GT(good.size(), 100u);
  EXPECT_FALSE(ParseLlama2cTokenizer("").ok());
  EXPECT_FALSE(ParseLlama2cTokenizer(good.substr(0, good.size() - 3)).ok());
  EXPECT_FALSE(ParseLlama2cTokenizer(good.substr(0, 200)).ok());
  std::string bad_len = good;
  bad_len[8] = '\x7f';  // length of token 0 -> huge
  EXPECT_FALSE(ParseLlama2cTokenizer(bad_len).ok());
  EXPECT_FALSE(LoadLlama2cTokenizer("/nonexistent/tok.bin").ok());
}

}  // namespace
}  // namespace specontext
