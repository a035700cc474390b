// GGUF vocabularies converted by HfTokenizerFromGguf tokenize like the HF tokenizers they came from:
//  - Llama 3 and Qwen3 tokenizer.json turned into GGUF metadata the way llama.cpp's converter does
//    (gguf_from_hf.h) must give the ids of tests/data/tokenizers/expected_<name>.jsonl (HF
//    `tokenizers` on the original files) for every string of strings.jsonl: this checks the
//    pre-tokenizer each tokenizer.ggml.pre name maps to;
//  - SmolLM2-135M-Instruct's real GGUF vocabulary (an extract, tests/data/tokenizers/
//    smollm2_gguf_vocab.json.xz) against HF ids from tools/reference/make_gguf_vocab_vectors.py;
//  - stories260K's SentencePiece vocabulary (tok512.bin) as a "llama" GGUF vocabulary against our
//    llama2.c tokenizer.
#include <fstream>

#include "core/io/gguf_vocab.h"
#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/gguf_from_hf.h"
#include "tests/tokenizer/test_strings.h"

namespace specontext {
namespace {

std::unique_ptr<Tokenizer> Convert(const GgufVocab& v) {
  auto texts = HfTokenizerFromGguf(v);
  EXPECT_TRUE(texts.ok()) << texts.status();
  if (!texts.ok()) return nullptr;
  auto tok = ParseHfTokenizer(texts->tokenizer_json, texts->tokenizer_config_json);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? *std::move(tok) : nullptr;
}

// Ids of every string against `expected_path` (one {"ids": [...]} per line); returns mismatches.
size_t CompareIds(const Tokenizer& tok, const std::vector<std::string>& strings,
                  const std::string& expected_path, bool check_decode) {
  std::ifstream in(expected_path);
  EXPECT_TRUE(in.good()) << expected_path;
  std::string line;
  size_t i = 0, mismatches = 0;
  for (; std::getline(in, line) && i < strings.size(); ++i) {
    const auto exp = nlohmann::json::parse(line);
    const auto ids_exp = exp["ids"].get<std::vector<int32_t>>();
    auto ids = tok.Encode(strings[i], /*add_bos=*/false);
    EXPECT_TRUE(ids.ok()) << ids.status();
    if (!ids.ok() || *ids != ids_exp) {
      ++mismatches;
      ADD_FAILURE() << "string " << i << " "
                    << nlohmann::json(strings[i]).dump(-1, ' ', false,
                                                       nlohmann::json::error_handler_t::replace)
                    << "\n  got      " << (ids.ok() ? nlohmann::json(*ids).dump() : "error")
                    << "\n  expected " << nlohmann::json(ids_exp).dump();
    }
    if (check_decode) {
      EXPECT_EQ(tok.Decode(ids_exp, /*skip_special=*/false), exp["decoded"].get<std::string>())
          << "decode of string " << i;
    }
  }
  EXPECT_EQ(i, strings.size()) << expected_path << " and the strings differ in length";
  return mismatches;
}

struct HfCase {
  const char* name;
  const char* pre;
};

class GgufFromHfTest : public ::testing::TestWithParam<HfCase> {};

TEST_P(GgufFromHfTest, MatchesOriginalTokenizer) {
  const std::string dir = std::string(SPECONTEXT_TOKENIZER_DIR) + "/" + GetParam().name;
  const GgufVocab v =
      testing::GgufVocabFromHf(testing::ReadFile(dir + "/tokenizer.json"),
                               testing::ReadFile(dir + "/tokenizer_config.json"), GetParam().pre);
  const auto tok = Convert(v);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), static_cast<int32_t>(v.tokens.size()));
  const auto strings = testing::ReadTestStrings(SPECONTEXT_TOKENIZER_STRINGS);
  ASSERT_GE(strings.size(), 320u);
  EXPECT_EQ(CompareIds(*tok, strings,
                       std::string(SPECONTEXT_TEST_DATA) + "/tokenizers/expected_" +
                           GetParam().name + ".jsonl",
                       /*check_decode=*/true),
            0u);
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, GgufFromHfTest,
                         ::testing::Values(HfCase{"llama3", "llama-bpe"}, HfCase{"qwen3", "qwen2"}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace specontext
