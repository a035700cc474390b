// HfTokenizerFromGguf on small hand-made vocabularies: what it produces, and every rejection
// (InvalidArgument or Unimplemented naming the problem, never a crash).
#include "core/io/gguf_vocab.h"

#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

// A byte-level vocabulary: "a", "b", "ab", "Ġ", "Ġab", control <|end|>, user-defined <think>.
GgufVocab SmallGpt2() {
  GgufVocab v;
  v.model = "gpt2";
  v.pre = "gpt-2";
  v.tokens = {"a",
              "b",
              "ab",
              "\xC4\xA0",
              "\xC4\xA0"
              "ab",
              "<|end|>",
              "<think>"};
  v.token_types = {1, 1, 1, 1, 1, 3, 4};
  v.merges = {"a b", "\xC4\xA0 ab"};
  v.eos_id = 5;
  return v;
}

// A SentencePiece vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces with scores.
GgufVocab SmallLlama() {
  GgufVocab v;
  v.model = "llama";
  v.tokens = {"<unk>", "<s>", "</s>"};
  v.token_types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    v.tokens.push_back(name);
    v.token_types.push_back(6);
  }
  for (const char* p : {"\xE2\x96\x81h", "i", "\xE2\x96\x81hi", "h", "\xE2\x96\x81"}) {
    v.tokens.push_back(p);
    v.token_types.push_back(1);
  }
  v.scores.assign(v.tokens.size(), 0.0f);
  v.scores[259] = -1;  // ▁h
  v.scores[260] = -4;  // i
  v.scores[261] = -2;  // ▁hi
  v.scores[262] = -5;  // h
  v.scores[263] = -3;  // ▁
  return v;
}

std::unique_ptr<Tokenizer> Parse(const GgufVocab& v) {
  auto texts = HfTokenizerFromGguf(v);
  EXPECT_TRUE(texts.ok()) << texts.status();
  auto tok = ParseHfTokenizer(texts->tokenizer_json, texts->tokenizer_config_json);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return *std::move(tok);
}

std::vector<int32_t> Ids(const Tokenizer& t, std::string_view s, bool bos = false) {
  auto ids = t.Encode(s, bos);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

TEST(GgufVocabTest, ByteLevelVocabulary) {
  const auto tok = Parse(SmallGpt2());
  EXPECT_EQ(Ids(*tok, "ab ab<|end|><think>"), (std::vector<int32_t>{2, 4, 5, 6}));
  EXPECT_TRUE(tok->IsSpecial(5));
  EXPECT_FALSE(tok->IsSpecial(6));
  EXPECT_EQ(tok->eos_ids(), std::vector<int32_t>{5});
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{2, 4}, false), "ab ab");
  EXPECT_FALSE(tok->default_add_bos());
}

TEST(GgufVocabTest, ConfigCarriesTemplateBosAndEndOfTurn) {
  GgufVocab v = SmallGpt2();
  v.bos_id = 0;
  v.eot_id = 6;
  v.add_bos = true;
  v.chat_template = "{{ messages }}";
  auto texts = HfTokenizerFromGguf(v);
  ASSERT_TRUE(texts.ok()) << texts.status();
  const auto config = nlohmann::json::parse(texts->tokenizer_config_json);
  EXPECT_EQ(config["chat_template"], "{{ messages }}");
  EXPECT_EQ(config["bos_token"], "a");
  EXPECT_EQ(config["add_bos_token"], true);
  const auto tok = Parse(v);
  EXPECT_EQ(tok->eos_ids(), (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(Ids(*tok, "b", true), (std::vector<int32_t>{0, 1}));
}

TEST(GgufVocabTest, EverySupportedPreTokenizerNameBuildsATokenizer) {
  for (const char* pre :
       {"llama-bpe", "llama3", "llama-v3", "qwen2", "deepseek-r1-qwen", "smollm", "starcoder",
        "refact", "gpt-2", "phi-2", "default", "", "deepseek-coder", "deepseek-v3", "tekken"}) {
    GgufVocab v = SmallGpt2();
    v.pre = pre;
    const auto tok = Parse(v);
    EXPECT_EQ(Ids(*tok, "ab<|end|>"), (std::vector<int32_t>{2, 5})) << pre;
  }
}

TEST(GgufVocabTest, Llama3NameAddsBosByDefault) {
  GgufVocab v = SmallGpt2();
  v.pre = "llama-bpe";
  v.bos_id = 0;
  EXPECT_TRUE(Parse(v)->default_add_bos());
  v.add_bos = false;
  EXPECT_FALSE(Parse(v)->default_add_bos());
}

TEST(GgufVocabTest, SentencePieceVocabulary) {
  const auto tok = Parse(SmallLlama());
  EXPECT_EQ(tok->bos_id(), 1);  // llama.cpp's default
  EXPECT_TRUE(tok->default_add_bos());
  // "▁hi" (score -2) beats "▁h"+"i" only through the merge ("▁h", "i"): best merged score first.
  EXPECT_EQ(Ids(*tok, "hi"), (std::vector<int32_t>{261}));
  EXPECT_EQ(Ids(*tok, "hi hi", true), (std::vector<int32_t>{1, 261, 261}));
  // Unknown characters fall back to bytes.
  EXPECT_EQ(Ids(*tok, "x"), (std::vector<int32_t>{263, 3 + 'x'}));
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{1, 261, 261, 3 + '!'}, true), "hi hi!");
  GgufVocab no_prefix = SmallLlama();
  no_prefix.add_space_prefix = false;
  EXPECT_EQ(Ids(*Parse(no_prefix), "hi"), (std::vector<int32_t>{262, 260}));
}

TEST(GgufVocabTest, DuplicateTokensResolveToTheLastLikeLlamaCpp) {
  GgufVocab v = SmallGpt2();
  v.tokens.push_back("ab");
  v.token_types.push_back(1);
  const auto tok = Parse(v);
  EXPECT_EQ(Ids(*tok, "ab"), std::vector<int32_t>{7});
  EXPECT_EQ(tok->vocab_size(), 8);
}

TEST(GgufVocabTest, EmptyTokensAreRenamedLikeLlamaCpp) {
  GgufVocab v = SmallGpt2();
  v.tokens[6] = "";
  const auto tok = Parse(v);
  EXPECT_EQ(tok->TokenToId("[EMPTY_6]"), 6);
}

void ExpectError(const GgufVocab& v, absl::StatusCode code, const std::string& words) {
  auto texts = HfTokenizerFromGguf(v);
  ASSERT_FALSE(texts.ok());
  EXPECT_EQ(texts.status().code(), code) << texts.status();
  EXPECT_NE(std::string(texts.status().message()).find(words), std::string::npos) << texts.status();
}

TEST(GgufVocabTest, Rejections) {
  using C = absl::StatusCode;
  GgufVocab v = SmallGpt2();
  v.model = "";
  ExpectError(v, C::kInvalidArgument, "tokenizer.ggml.model");
  for (const char* model : {"bert", "t5", "rwkv", "none"}) {
    v.model = model;
    ExpectError(v, C::kUnimplemented, model);
  }
  v = SmallGpt2();
  v.pre = "falcon";
  ExpectError(v, C::kUnimplemented, "'falcon' is not supported; supported: llama-bpe");
  v.pre = "deepseek-llm";
  ExpectError(v, C::kUnimplemented, "'deepseek-llm' is not supported");
  v = SmallGpt2();
  v.tokens.clear();
  v.token_types.clear();
  ExpectError(v, C::kInvalidArgument, "empty vocabulary");
  v = SmallGpt2();
  v.token_types.pop_back();
  ExpectError(v, C::kInvalidArgument, "6 token types for 7 tokens");
  v = SmallGpt2();
  v.token_types[0] = 9;
  ExpectError(v, C::kInvalidArgument, "token 0 has unknown type 9");
  v = SmallGpt2();
  v.scores = {1, 2};
  ExpectError(v, C::kInvalidArgument, "2 scores for 7 tokens");
  for (int64_t GgufVocab::*id : {&GgufVocab::bos_id, &GgufVocab::eos_id, &GgufVocab::unk_id,
                                 &GgufVocab::pad_id, &GgufVocab::eot_id}) {
    v = SmallGpt2();
    v.*id = 7;
    ExpectError(v, C::kInvalidArgument, "out of range (7 tokens)");
    v.*id = -2;
    ExpectError(v, C::kInvalidArgument, "out of range");
  }
  v = SmallGpt2();
  v.merges = {"a c"};
  ExpectError(v, C::kInvalidArgument, "merge 0 uses or makes a token not in the vocabulary");
  v.merges = {"b a"};  // "ba" is no token
  ExpectError(v, C::kInvalidArgument, "merge 0");
  for (const char* bad : {"ab", " a b", "a b ", "a  b", "a b c"}) {
    v.merges = {bad};
    ExpectError(v, C::kInvalidArgument, "not two tokens split by one space");
  }
  v.merges.clear();
  ExpectError(v, C::kInvalidArgument, "needs tokenizer.ggml.merges");
  v = SmallGpt2();
  v.tokens[0] = "\xFF";
  ExpectError(v, C::kInvalidArgument, "token 0 is not valid UTF-8");
  v = SmallGpt2();
  v.chat_template = "\xC3";
  ExpectError(v, C::kInvalidArgument, "chat_template is not valid UTF-8");

  GgufVocab l = SmallLlama();
  l.scores.clear();
  ExpectError(l, C::kInvalidArgument, "needs tokenizer.ggml.scores");
  l = SmallLlama();
  l.scores[5] = std::numeric_limits<float>::quiet_NaN();
  ExpectError(l, C::kInvalidArgument, "score of token 5 is not finite");
  l = SmallLlama();
  l.tokens[260] = std::string(2000, 'x');
  ExpectError(l, C::kInvalidArgument, "token 260 is 2000 bytes");
}

}  // namespace
}  // namespace specontext
