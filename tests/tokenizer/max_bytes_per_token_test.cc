// Tokenizer::MaxBytesPerToken is a true bound (a text never encodes to fewer tokens than its bytes
// divided by it) on the real tokenizers, and is withheld where text can vanish.
#include <random>

#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/tokenizer/test_strings.h"

namespace specontext {
namespace {

using nlohmann::json;

std::vector<std::string> Texts() {
  std::vector<std::string> texts = testing::ReadTestStrings(SPECONTEXT_TOKENIZER_STRINGS);
  for (const std::string unit : {" ", "\n", "a", "7", "=", "\u4f60", "\xF0\x9F\x98\x80", "\xFF"}) {
    std::string run;
    while (run.size() < 20000) run += unit;
    texts.push_back(run);
  }
  std::mt19937 rng(std::random_device{}());
  for (int k = 0; k < 20; ++k) {
    std::string s;
    for (int i = 0; i < 2000; ++i) s += static_cast<char>(rng() % 256);
    texts.push_back(s);
  }
  return texts;
}

void ExpectBoundHolds(const Tokenizer& tok, const std::string& name) {
  const std::optional<int64_t> per_token = tok.MaxBytesPerToken();
  ASSERT_TRUE(per_token.has_value()) << name;
  ASSERT_GT(*per_token, 0);
  for (const std::string& text : Texts()) {
    auto ids = tok.Encode(text, false);
    ASSERT_TRUE(ids.ok());
    const int64_t bytes = static_cast<int64_t>(text.size());
    EXPECT_GE(static_cast<int64_t>(ids->size()) * *per_token, bytes) << name << ": " << text;
  }
}

TEST(MaxBytesPerTokenTest, BoundsTheRealTokenizers) {
  for (const std::string name : {"llama3", "qwen3"}) {
    auto tok =
        LoadHfTokenizer(std::string(SPECONTEXT_TOKENIZER_DIR) + "/" + name + "/tokenizer.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    ExpectBoundHolds(**tok, name);
  }
  auto tok = LoadLlama2cTokenizer(std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/tok512.bin");
  ASSERT_TRUE(tok.ok()) << tok.status();
  ExpectBoundHolds(**tok, "stories260K");
}

// Stages that can delete any amount of text leave no bound.
TEST(MaxBytesPerTokenTest, NoBoundWhereTextCanVanish) {
  const json qwen3 = json::parse(
      testing::ReadFile(std::string(SPECONTEXT_TOKENIZER_DIR) + "/qwen3/tokenizer.json"));
  auto bound = [](const json& j) {
    auto tok = ParseHfTokenizer(j.dump(), "");
    EXPECT_TRUE(tok.ok()) << tok.status();
    return tok.ok() ? (*tok)->MaxBytesPerToken() : std::optional<int64_t>(-1);
  };
  EXPECT_TRUE(bound(qwen3).has_value());
  json strip = qwen3;
  strip["normalizer"] = {{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}};
  EXPECT_EQ(bound(strip), std::nullopt);
  json regex_replace = qwen3;
  regex_replace["normalizer"] = {
      {"type", "Replace"}, {"pattern", {{"Regex", " +"}}}, {"content", " "}};
  EXPECT_EQ(bound(regex_replace), std::nullopt);
  json removed = qwen3;
  removed["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
  EXPECT_EQ(bound(removed), std::nullopt);
  json lstrip = qwen3;
  lstrip["added_tokens"][0]["lstrip"] = true;
  EXPECT_EQ(bound(lstrip), std::nullopt);
  // Without its ByteLevel stage, characters outside the vocabulary are dropped.
  json no_byte_level = qwen3;
  no_byte_level["pre_tokenizer"] = nullptr;
  EXPECT_EQ(bound(no_byte_level), std::nullopt);
}

}  // namespace
}  // namespace specontext
