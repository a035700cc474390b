// GGUF vocabularies converted by HfTokenizerFromGguf tokenize like the HF tokenizers they came
// from:
//  - Llama 3 and Qwen3 tokenizer.json turned into GGUF metadata the way llama.cpp's converter does
//    (gguf_from_hf.h) must give the ids of tests/data/tokenizers/expected_<name>.jsonl (HF
//    `tokenizers` on the original files) for every string of strings.jsonl: this checks the
//    pre-tokenizer each tokenizer.ggml.pre name maps to;
//  - SmolLM2-135M-Instruct's real GGUF vocabulary (an extract, tests/data/tokenizers/
//    smollm2_gguf_vocab.tar.xz) against the ids of HF `tokenizers` on SmolLM2's tokenizer.json,
//    from tools/reference/make_gguf_vocab_vectors.py, on strings.jsonl and corpus lines;
//  - stories260K's SentencePiece vocabulary (tok512.bin) as a "llama" GGUF vocabulary against our
//    llama2.c tokenizer.
#include <cstring>
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
                    << nlohmann::json(strings[i])
                           .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
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

// The extract of the real GGUF's tokenizer keys (make_gguf_vocab_vectors.py writes it).
GgufVocab ReadSmolLm2Vocab() {
  const auto j = nlohmann::json::parse(
      testing::ReadFile(std::string(SPECONTEXT_TOKENIZER_DIR) + "/smollm2/gguf_vocab.json"));
  GgufVocab v;
  v.model = j["model"];
  v.pre = j["pre"];
  v.tokens = j["tokens"].get<std::vector<std::string>>();
  v.token_types = j["token_types"].get<std::vector<int32_t>>();
  v.merges = j["merges"].get<std::vector<std::string>>();
  v.bos_id = j["bos_id"];
  v.eos_id = j["eos_id"];
  v.unk_id = j["unk_id"];
  v.pad_id = j["pad_id"];
  v.add_bos = j["add_bos"].get<bool>();
  v.add_space_prefix = j["add_space_prefix"].get<bool>();
  v.chat_template = j["chat_template"];
  return v;
}

TEST(GgufSmolLm2Test, MatchesHfOnStringsAndCorpusLines) {
  const GgufVocab v = ReadSmolLm2Vocab();
  ASSERT_EQ(v.tokens.size(), 49152u);
  const auto tok = Convert(v);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), 1);  // <|im_start|>
  EXPECT_FALSE(tok->default_add_bos());
  EXPECT_EQ(tok->eos_ids(), (std::vector<int32_t>{0, 2}));  // <|endoftext|>, <|im_end|>
  EXPECT_TRUE(tok->IsSpecial(2));
  const std::string data = std::string(SPECONTEXT_TEST_DATA) + "/tokenizers/";
  EXPECT_EQ(CompareIds(*tok, testing::ReadTestStrings(SPECONTEXT_TOKENIZER_STRINGS),
                       data + "expected_smollm2.jsonl", /*check_decode=*/true),
            0u);
  // Corpus lines carry their text.
  std::vector<std::string> lines;
  std::ifstream in(data + "expected_smollm2_corpora.jsonl");
  for (std::string line; std::getline(in, line);) {
    lines.push_back(nlohmann::json::parse(line)["text"].get<std::string>());
  }
  ASSERT_GE(lines.size(), 200u);
  EXPECT_EQ(CompareIds(*tok, lines, data + "expected_smollm2_corpora.jsonl", /*check_decode=*/true),
            0u);
}

// stories260K's tok512.bin as a GGUF "llama" vocabulary, as llama.cpp would write the
// SentencePiece model it came from: llama2.c's export spells U+2581 as a space and wraps BOS/EOS
// in newlines, so those go back to "▁", "<s>" and "</s>"; <unk> is UNKNOWN, BOS/EOS CONTROL,
// <0xXX> BYTE.
GgufVocab Stories260kVocab(const std::string& bin) {
  GgufVocab v;
  v.model = "llama";
  size_t off = 4;
  while (off + 8 <= bin.size()) {
    float score;
    int32_t len;
    std::memcpy(&score, bin.data() + off, 4);
    std::memcpy(&len, bin.data() + off + 4, 4);
    std::string piece = bin.substr(off + 8, static_cast<size_t>(len));
    off += 8 + static_cast<size_t>(len);
    const size_t id = v.tokens.size();
    for (size_t p; (p = piece.find(' ')) != std::string::npos;) piece.replace(p, 1, "\xE2\x96\x81");
    if (id == 1) piece = "<s>";
    if (id == 2) piece = "</s>";
    v.token_types.push_back(id == 0 ? 2 : id < 3 ? 3 : id < 259 ? 6 : 1);
    v.tokens.push_back(std::move(piece));
    v.scores.push_back(score);
  }
  v.bos_id = 1;
  v.eos_id = 2;
  v.unk_id = 0;
  return v;
}

TEST(GgufStories260kTest, SentencePieceVocabularyMatchesLlama2cTokenizer) {
  const std::string bin =
      testing::ReadFile(std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/tok512.bin");
  const GgufVocab v = Stories260kVocab(bin);
  ASSERT_EQ(v.tokens.size(), 512u);
  const auto tok = Convert(v);
  ASSERT_NE(tok, nullptr);
  auto ref = ParseLlama2cTokenizer(bin);
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_TRUE(tok->default_add_bos());
  size_t compared = 0, mismatches = 0;
  for (const std::string& s : testing::ReadTestStrings(SPECONTEXT_TOKENIZER_STRINGS)) {
    // The llama2.c tokenizer reads "<s>" in text as text; HF and llama.cpp match special tokens.
    if (s.find("<s>") != std::string::npos || s.find("</s>") != std::string::npos ||
        s.find("<unk>") != std::string::npos) {
      continue;
    }
    ++compared;
    auto got = tok->Encode(s, /*add_bos=*/true);
    auto want = (*ref)->Encode(s, /*add_bos=*/true);
    ASSERT_TRUE(got.ok() && want.ok());
    if (*got != *want) {
      ++mismatches;
      ADD_FAILURE() << nlohmann::json(s).dump(-1, ' ', false,
                                              nlohmann::json::error_handler_t::replace)
                    << "\n  got      " << nlohmann::json(*got).dump() << "\n  expected "
                    << nlohmann::json(*want).dump();
    }
    EXPECT_EQ(tok->Decode(*want, /*skip_special=*/true), (*ref)->Decode(*want, true));
  }
  EXPECT_GE(compared, 400u);
  EXPECT_EQ(mismatches, 0u);
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, GgufFromHfTest,
                         ::testing::Values(HfCase{"llama3", "llama-bpe"}, HfCase{"qwen3", "qwen2"}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace specontext
