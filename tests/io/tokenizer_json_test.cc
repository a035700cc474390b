// The generated tokenizer.json is structurally a valid HF byte-level BPE file of the requested size.
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

void CheckTokenizer(int64_t vocab, const std::vector<SpecialToken>& specials, const std::string& bos) {
  absl::StatusOr<std::string> text = MakeByteLevelBpeTokenizerJson(vocab, specials, bos);
  ASSERT_TRUE(text.ok()) << text.status();
  const json t = json::parse(*text);
  EXPECT_EQ(t["model"]["type"], "BPE");
  EXPECT_EQ(t["pre_tokenizer"]["type"], "ByteLevel");
  EXPECT_EQ(t["decoder"]["type"], "ByteLevel");
  std::map<int64_t, std::string> by_id;
  for (auto it = t["model"]["vocab"].begin(); it != t["model"]["vocab"].end(); ++it) {
    ASSERT_TRUE(by_id.emplace(it.value().get<int64_t>(), it.key()).second) << "duplicate id " << it.value();
  }
  const size_t model_size = by_id.size();
  for (const json& a : t["added_tokens"]) {
    ASSERT_TRUE(by_id.emplace(a["id"].get<int64_t>(), a["content"].get<std::string>()).second) << a.dump();
    EXPECT_TRUE(a["special"].get<bool>());
  }
  ASSERT_EQ(static_cast<int64_t>(by_id.size()), vocab);
  EXPECT_EQ(by_id.begin()->first, 0);
  EXPECT_EQ(by_id.rbegin()->first, vocab - 1);
  EXPECT_GE(model_size, 256u + std::min<int64_t>(20, vocab - 256 - specials.size())) << "merges were learned";
  for (const SpecialToken& s : specials) EXPECT_EQ(by_id[s.id], s.content);
  // Every merge joins two known tokens into a known token.
  const json& vocab_json = t["model"]["vocab"];
  for (const json& m : t["model"]["merges"]) {
    const std::string line = m.get<std::string>();
    const size_t sp = line.find(' ');
    ASSERT_NE(sp, std::string::npos);
    const std::string a = line.substr(0, sp), b = line.substr(sp + 1);
    EXPECT_TRUE(vocab_json.contains(a) && vocab_json.contains(b) && vocab_json.contains(a + b)) << line;
  }
  // Byte tokens: the 256 GPT-2 byte symbols, id = byte value ('A' is 65, space is 'Ġ' U+0120).
  EXPECT_EQ(vocab_json["A"], 65);
  EXPECT_EQ(vocab_json["\xC4\xA0"], 32);
  if (!bos.empty()) {
    EXPECT_EQ(t["post_processor"]["type"], "TemplateProcessing");
  } else {
    EXPECT_TRUE(t["post_processor"].is_null());
  }
}

TEST(TokenizerJsonTest, TinyAndLargeVocabularies) {
  CheckTokenizer(320, {{318, "<|begin_of_text|>"}, {319, "<|end_of_text|>"}}, "<|begin_of_text|>");
  CheckTokenizer(448, {{446, "<|endoftext|>"}, {447, "<|im_end|>"}}, "");
  CheckTokenizer(128256, {{128000, "<|begin_of_text|>"}, {128001, "<|end_of_text|>"}}, "<|begin_of_text|>");
}

TEST(TokenizerJsonTest, RejectsImpossibleRequests) {
  EXPECT_THAT(MakeByteLevelBpeTokenizerJson(257, {{256, "<a>"}, {257, "<b>"}}, "").status().message(),
              HasSubstr("below 256"));
  EXPECT_THAT(MakeByteLevelBpeTokenizerJson(400, {{100, "<a>"}}, "").status().message(), HasSubstr("[256, 400)"));
  EXPECT_THAT(MakeByteLevelBpeTokenizerJson(400, {{300, "<a>"}, {301, "<a>"}}, "").status().message(),
              HasSubstr("duplicated"));
  EXPECT_THAT(MakeByteLevelBpeTokenizerJson(400, {{300, "<a>"}}, "<bos>").status().message(),
              HasSubstr("not among"));
}

}  // namespace
}  // namespace specontext
