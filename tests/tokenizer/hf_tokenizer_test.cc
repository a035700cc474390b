// HF tokenizer.json loading: the real Qwen3 / Llama 3 files (special tokens, BOS/EOS, speed), a
// synthetic Llama-2-style (SentencePiece BPE with byte fallback) file, added-token flags, and
// malformed files that must give errors rather than crashes.
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <thread>

#include "core/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/tokenizer/test_strings.h"

namespace specontext {
namespace {

using nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::unique_ptr<Tokenizer> LoadReal(const std::string& name) {
  auto tok =
      LoadHfTokenizer(std::string(SPECONTEXT_TOKENIZER_DIR) + "/" + name + "/tokenizer.json");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

// A FIFO named as a tokenizer file would block the open until a writer came: refused at once.
TEST(TokenizerFilesTest, FifosAreRefusedWithoutBlocking) {
  const std::string fifo = ::testing::TempDir() + "/tokenizer_fifo_" + std::to_string(getpid());
  ::unlink(fifo.c_str());
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  std::atomic<bool> finished{false};
  std::thread loader([&] {
    EXPECT_FALSE(LoadHfTokenizer(fifo).ok());
    EXPECT_FALSE(LoadLlama2cTokenizer(fifo).ok());
    finished = true;
  });
  for (int i = 0; i < 100 && !finished; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (!finished) {
    // Unblock the loader (a writer end lets the open return) so that the test can end, and fail.
    std::ofstream unblock(fifo);
    ADD_FAILURE() << "loading a FIFO blocked";
  }
  loader.join();
  ::unlink(fifo.c_str());
}

TEST(HfTokenizerTest, Qwen3KnownIdsAndSpecialTokens) {
  auto tok = LoadReal("qwen3");
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("Hello, my dog is cute", /*add_bos=*/true);  // qwen3 has no BOS
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(9707, 11, 847, 5562, 374, 18838));
  EXPECT_EQ(tok->vocab_size(), 151669);
  EXPECT_EQ(tok->bos_id(), -1);
  EXPECT_FALSE(tok->default_add_bos());
  EXPECT_EQ(tok->TokenToId("<|im_end|>"), 151645);
  EXPECT_EQ(tok->TokenToId("<think>"), 151667);
  EXPECT_TRUE(tok->IsSpecial(151645));
  EXPECT_FALSE(tok->IsSpecial(151667));  // <think> is added but not special
  EXPECT_FALSE(tok->IsSpecial(9707));
  EXPECT_THAT(tok->eos_ids(), ElementsAre(151643, 151645));
  auto chat = tok->Encode("<|im_start|>user\nhi<|im_end|>", false);
  ASSERT_TRUE(chat.ok());
  EXPECT_EQ(chat->front(), 151644);
  EXPECT_EQ(chat->back(), 151645);
  EXPECT_EQ(tok->Decode(*chat, /*skip_special=*/true), "user\nhi");
  EXPECT_EQ(tok->TokenBytes(9707), "Hello");
  EXPECT_EQ(tok->TokenBytes(-5), "");
  EXPECT_EQ(tok->TokenBytes(1 << 30), "");
}

TEST(HfTokenizerTest, Llama3BosEos) {
  auto tok = LoadReal("llama3");
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 128256);
  EXPECT_EQ(tok->bos_id(), 128000);
  EXPECT_TRUE(tok->default_add_bos());
  const auto eos = tok->eos_ids();
  EXPECT_THAT(eos, ::testing::Contains(128001));  // <|end_of_text|> (config eos_token)
  EXPECT_THAT(eos, ::testing::Contains(128009));  // <|eot_id|>
  auto ids = tok->Encode("Hello world", /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  ASSERT_EQ(ids->size(), 3u);
  EXPECT_EQ((*ids)[0], 128000);
  EXPECT_EQ(tok->Decode(*ids, true), "Hello world");
  EXPECT_EQ(tok->Decode(*ids, false), "<|begin_of_text|>Hello world");
}

TEST(HfTokenizerTest, WithoutConfigUsesWellKnownTokens) {
  const std::string json_text =
      testing::ReadFile(std::string(SPECONTEXT_TOKENIZER_DIR) + "/llama3/tokenizer.json");
  auto tok = ParseHfTokenizer(json_text, "");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), 128000);
  EXPECT_THAT((*tok)->eos_ids(), ::testing::Contains(128009));
  auto bad = ParseHfTokenizer(json_text, R"({"bos_token": "<|no_such_token|>"})");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("<|no_such_token|>"));
}

// Encoding 100 KB of prose must be fast (< 0.5 s in an optimised build).
TEST(HfTokenizerTest, Encodes100KBQuickly) {
  auto tok = LoadReal("qwen3");
  ASSERT_NE(tok, nullptr);
  std::string text = testing::ReadFile("/work/shared/corpora/devil.txt");
  if (text.size() < 100000) {  // outside the lab: build a varied text from the test strings
    text.clear();
    const auto strings = testing::ReadTestStrings(SPECONTEXT_TOKENIZER_STRINGS);
    while (text.size() < 100000)
      for (const auto& s : strings) text += s + " ";
  }
  text.resize(100000);
  const auto t0 = std::chrono::steady_clock::now();
  auto ids = tok->Encode(text, false);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(ids.ok());
  std::printf("encoded 100000 bytes -> %zu tokens in %.3f s\n", ids->size(), s);
  EXPECT_EQ(tok->Decode(*ids, false),
            tok->Decode(*tok->Encode(tok->Decode(*ids, false), false), false));
#ifdef NDEBUG
  EXPECT_LT(s, 0.5);
#endif
}

// Long runs stress the regex (backtracking over \s+(?!\S)) and BPE on one huge word.
TEST(HfTokenizerTest, LongRunsEncodeAndRoundTrip) {
  for (const std::string name : {"qwen3", "llama3"}) {
    auto tok = LoadReal(name);
    ASSERT_NE(tok, nullptr);
    for (const std::string unit :
         {" ", "\n", "a", "7", "!", "\u4f60", "\xF0\x9F\x98\x80", " \t", "ab "}) {
      std::string text;
      while (text.size() < 200000) text += unit;
      text += "end";
      const auto t0 = std::chrono::steady_clock::now();
      auto ids = tok->Encode(text, false);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      ASSERT_TRUE(ids.ok()) << name << " " << ids.status();
      EXPECT_EQ(tok->Decode(*ids, false), text) << name;
      EXPECT_LT(s, 5.0) << name << " run of '" << unit << "'";
    }
  }
}

// Encode is const and may run on many threads at once (the BPE word cache is shared).
TEST(HfTokenizerTest, ConcurrentEncodeMatchesSerial) {
  auto tok = LoadReal("qwen3");
  ASSERT_NE(tok, nullptr);
  const auto strings = testing::ReadTestStrings(SPECONTEXT_TOKENIZER_STRINGS);
  std::vector<std::vector<int32_t>> serial;
  for (const auto& s : strings) serial.push_back(*tok->Encode(s, false));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t k = 0; k < strings.size(); ++k) {
        const size_t i = (k * 7 + t * 13) % strings.size();
        auto ids = tok->Encode(strings[i], false);
        if (!ids.ok() || *ids != serial[i]) ++mismatches;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// A tiny Llama-2-style tokenizer.json: SentencePiece BPE with byte fallback, written by hand.
json SentencePieceStyle(bool metaspace) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  const std::vector<std::string> pieces = {
      "▁",  "h",  "e",   "l",     "o",      "w",  "r",  "d",    "c",     "a",     "b",
      "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "▁wor", "▁worl", "▁world"};
  for (size_t i = 0; i < pieces.size(); ++i) vocab[pieces[i]] = 259 + static_cast<int>(i);
  json merges = json::array({"h e", "l l", "ll o", "he llo", "▁ hello", "▁ w", "o r", "▁w or"});
  merges.push_back(json::array({"▁wor", "l"}));  // the pair form is accepted too
  merges.push_back(json::array({"▁worl", "d"}));
  json j = {{"version", "1.0"},
            {"model",
             {{"type", "BPE"},
              {"vocab", vocab},
              {"merges", merges},
              {"unk_token", "<unk>"},
              {"byte_fallback", true},
              {"fuse_unk", true},
              {"dropout", nullptr}}},
            {"added_tokens",
             json::array({
                 {{"id", 0}, {"content", "<unk>"}, {"special", true}},
                 {{"id", 1}, {"content", "<s>"}, {"special", true}},
                 {{"id", 2}, {"content", "</s>"}, {"special", true}},
                 {{"id", 300},
                  {"content", "<mask>"},
                  {"special", true},
                  {"lstrip", true},
                  {"normalized", false}},
                 {{"id", 301},
                  {"content", "[X]"},
                  {"special", false},
                  {"rstrip", true},
                  {"normalized", false}},
                 {{"id", 302},
                  {"content", "ab"},
                  {"special", false},
                  {"single_word", true},
                  {"normalized", false}},
                 // Normalized: matched after the normalizer, as its normalized content ("▁zz").
                 {{"id", 303}, {"content", "zz"}, {"special", false}, {"normalized", true}},
             })}};
  if (metaspace) {
    j["normalizer"] = nullptr;
    j["pre_tokenizer"] = {
        {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};
    j["decoder"] = {
        {"type", "Sequence"},
        {"decoders",
         json::array(
             {{{"type", "ByteFallback"}},
              {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}}})}};
  } else {
    j["normalizer"] = {
        {"type", "Sequence"},
        {"normalizers",
         json::array({{{"type", "Prepend"}, {"prepend", "▁"}},
                      {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}})}};
    j["pre_tokenizer"] = nullptr;
    j["decoder"] = {
        {"type", "Sequence"},
        {"decoders",
         json::array({{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
                      {{"type", "ByteFallback"}},
                      {{"type", "Fuse"}},
                      {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}})}};
  }
  return j;
}

class SentencePieceStyleTest : public ::testing::TestWithParam<bool> {};

TEST_P(SentencePieceStyleTest, EncodesMergesBytesAndAddedTokens) {
  auto tok = ParseHfTokenizer(SentencePieceStyle(GetParam()).dump(), R"({"bos_token": "<s>"})");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const Tokenizer& t = **tok;
  const int32_t sp = 259, hello = 259 + 15, world = 259 + 20;
  auto ids = t.Encode("hello world", /*add_bos=*/true);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(1, hello, world));
  EXPECT_EQ(t.Decode(*ids, true), "hello world");
  // é is not in the vocabulary: byte fallback to <0xC3><0xA9>.
  ids = t.Encode("hé", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(sp, 260, 3 + 0xC3, 3 + 0xA9));
  EXPECT_EQ(t.Decode(*ids, true), "hé");
  // lstrip: <mask> swallows the space before it.
  ids = t.Encode("hello <mask>", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(hello, 300));
  // rstrip: [X] swallows the spaces after it; the rest is a new segment (gets its own prefix).
  ids = t.Encode("[X]  hello", false);
  ASSERT_TRUE(ids.ok());
  // Metaspace's prepend_scheme "first" only prefixes the piece at the start of the input.
  EXPECT_THAT(*ids, ElementsAre(301, GetParam() ? 259 + 14 : hello));
}

INSTANTIATE_TEST_SUITE_P(NormalizerOrMetaspace, SentencePieceStyleTest, ::testing::Bool());

TEST(HfTokenizerTest, SingleWordAndNormalizedAddedTokens) {
  auto tok = ParseHfTokenizer(SentencePieceStyle(false).dump(), "");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const int32_t sp = 259, c = 267, a = 268, b = 269, hello = 259 + 15, z = 3 + 'z';
  // "ab" matches alone but not inside "cab".
  auto ids = (*tok)->Encode("ab cab ab", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(302, sp, sp, c, a, b, sp, 302));
  // "zz" is found as "▁zz" in the normalized text "▁hello▁zz", not inside "▁hellozz".
  ids = (*tok)->Encode("hello zz", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(hello, 303));
  ids = (*tok)->Encode("hellozz", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(hello, z, z));
}

TEST(HfTokenizerTest, UnkWithoutByteFallbackIsFused) {
  json j = SentencePieceStyle(false);
  j["model"]["byte_fallback"] = false;
  auto tok = ParseHfTokenizer(j.dump(), "");
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto ids = (*tok)->Encode("hééh", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(259, 260, 0, 260));  // two unknown chars -> one fused <unk>
}

TEST(HfTokenizerTest, MalformedFilesGiveErrors) {
  const json good = SentencePieceStyle(false);
  ASSERT_TRUE(ParseHfTokenizer(good.dump(), "").ok());
  struct Case {
    std::string what, text, message;
  };
  std::vector<Case> cases = {
      {"not json", "{\"model\": ", "not valid JSON"},
      {"array", "[1, 2]", "must be a JSON object"},
      {"no model", R"({"added_tokens": []})", "no 'model'"},
      {"deep", std::string(500, '[') + std::string(500, ']'), "nested deeper"},
  };
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = good;
    edit(j);
    return j.dump();
  };
  cases.push_back(
      {"wordpiece", with([](json& j) { j["model"]["type"] = "WordPiece"; }), "WordPiece"});
  cases.push_back({"normalizer", with([](json& j) {
                     j["normalizer"] = {{"type", "BertNormalizer"}};
                   }),
                   "BertNormalizer"});
  cases.push_back({"pretok", with([](json& j) {
                     j["pre_tokenizer"] = {{"type", "Whitespace"}};
                   }),
                   "Whitespace"});
  cases.push_back({"decoder", with([](json& j) {
                     j["decoder"] = {{"type", "WordPiece"}};
                   }),
                   "WordPiece"});
  cases.push_back({"bad regex", with([](json& j) {
                     j["pre_tokenizer"] = {{"type", "Split"},
                                           {"pattern", {{"Regex", "(\\p{L"}}},
                                           {"behavior", "Isolated"}};
                   }),
                   "bad regex"});
  cases.push_back({"behavior", with([](json& j) {
                     j["pre_tokenizer"] = {{"type", "Split"},
                                           {"pattern", {{"String", "x"}}},
                                           {"behavior", "Sideways"}};
                   }),
                   "Sideways"});
  cases.push_back({"merge oov", with([](json& j) { j["model"]["merges"].push_back("zz qq"); }),
                   "not in vocab"});
  cases.push_back(
      {"merge shape", with([](json& j) { j["model"]["merges"].push_back("abc"); }), "two tokens"});
  cases.push_back({"neg id", with([](json& j) { j["model"]["vocab"]["x"] = -4; }), "'x'"});
  cases.push_back({"huge id", with([](json& j) { j["model"]["vocab"]["x"] = 1LL << 40; }), "'x'"});
  cases.push_back({"vocab type", with([](json& j) { j["model"]["vocab"] = "oops"; }), "vocab"});
  cases.push_back({"added", with([](json& j) { j["added_tokens"] = 5; }), "added_tokens"});
  cases.push_back({"added id", with([](json& j) { j["added_tokens"][0]["id"] = "x"; }), "id"});
  cases.push_back({"flag", with([](json& j) { j["added_tokens"][0]["lstrip"] = 3; }), "lstrip"});
  cases.push_back({"dropout", with([](json& j) { j["model"]["dropout"] = 0.1; }), "dropout"});
  cases.push_back(
      {"strip stop", with([](json& j) { j["decoder"]["decoders"][3]["stop"] = 2; }), "stop"});
  for (const Case& c : cases) {
    auto tok = ParseHfTokenizer(c.text, "");
    ASSERT_FALSE(tok.ok()) << c.what;
    EXPECT_THAT(std::string(tok.status().message()), HasSubstr(c.message)) << c.what;
  }
  EXPECT_FALSE(ParseHfTokenizer(good.dump(), "{not json").ok());
  EXPECT_TRUE(absl::IsNotFound(LoadHfTokenizer("/nonexistent/tokenizer.json").status()));
}

}  // namespace
}  // namespace specontext
