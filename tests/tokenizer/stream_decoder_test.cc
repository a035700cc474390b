// StreamDecoder: pushing ids one at a time yields exactly Decode(all ids), never a broken
// character.
#include <random>

#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/utf8.h"
#include "gtest/gtest.h"

namespace specontext {
namespace {

std::string StreamAll(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip,
                      int* empty_pushes = nullptr) {
  StreamDecoder dec(tok, skip);
  std::string out;
  for (const int32_t id : ids) {
    const std::string piece = dec.Push(id);
    EXPECT_TRUE(utf8::IsValid(piece));
    if (piece.empty() && empty_pushes != nullptr) ++*empty_pushes;
    out += piece;
  }
  return out + dec.Flush();
}

TEST(StreamDecoderTest, SplitMultiByteCharactersQwen3) {
  auto tok = LoadHfTokenizer(std::string(SPECONTEXT_TOKENIZER_DIR) + "/qwen3/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  for (const std::string text :
       {"👨‍👩‍👧‍👦 family 👍🏽 and 🫠", "日本語のテキスト、中文测试，한국어",
        "<|im_start|>user\n😀<|im_end|>", "e\u0301 \u00e9 \u212b", "plain ascii text"}) {
    auto ids = (*tok)->Encode(text, false);
    ASSERT_TRUE(ids.ok());
    for (const bool skip : {false, true}) {
      int empty = 0;
      EXPECT_EQ(StreamAll(**tok, *ids, skip, &empty), (*tok)->Decode(*ids, skip)) << text;
    }
  }
  // The family emoji is split over several byte-level tokens: some pushes must hold bytes back.
  auto ids = (*tok)->Encode("👨‍👩‍👧‍👦", false);
  ASSERT_TRUE(ids.ok());
  ASSERT_GT(ids->size(), 1u);
  int empty = 0;
  EXPECT_EQ(StreamAll(**tok, *ids, false, &empty), "👨‍👩‍👧‍👦");
  EXPECT_GT(empty, 0);
}

TEST(StreamDecoderTest, RandomIdsMatchDecode) {
  auto tok = LoadHfTokenizer(std::string(SPECONTEXT_TOKENIZER_DIR) + "/llama3/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::mt19937 rng(std::random_device{}());
  for (int iter = 0; iter < 300; ++iter) {
    std::vector<int32_t> ids(1 + rng() % 20);
    // Mostly low ids (single bytes and byte pairs, which split characters), some anywhere.
    for (int32_t& id : ids)
      id = rng() % 4 ? static_cast<int32_t>(rng() % 300)
                     : static_cast<int32_t>(rng() % (*tok)->vocab_size());
    const bool skip = rng() % 2;
    ASSERT_EQ(StreamAll(**tok, ids, skip), (*tok)->Decode(ids, skip));
  }
}

TEST(StreamDecoderTest, Llama2cByteFallbackAndLeadingSpace) {
  auto tok = LoadLlama2cTokenizer(std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/tok512.bin");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::string text = "Once upon a time 🐍 there was a 日本 cat";
  auto ids = (*tok)->Encode(text, /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(StreamAll(**tok, *ids, true), text);
  EXPECT_EQ(StreamAll(**tok, *ids, false), (*tok)->Decode(*ids, false));
  StreamDecoder dec(**tok, true);
  dec.Push((*ids)[0]);
  dec.Reset();
  std::string again;
  for (const int32_t id : *ids) again += dec.Push(id);
  EXPECT_EQ(again + dec.Flush(), text);
}

TEST(StreamDecoderTest, DanglingPartialSequenceFlushesAsReplacement) {
  auto tok = LoadHfTokenizer(std::string(SPECONTEXT_TOKENIZER_DIR) + "/qwen3/tokenizer.json");
  ASSERT_TRUE(tok.ok());
  // Byte-level token "ð" is the lone byte 0xF0: the start of a 4-byte sequence.
  const auto lead = (*tok)->TokenToId("\u00f0");
  ASSERT_TRUE(lead.has_value());
  EXPECT_EQ((*tok)->TokenBytes(*lead), "\xF0");
  StreamDecoder dec(**tok, false);
  std::string out = dec.Push(*lead);
  EXPECT_EQ(out, "");
  out += dec.Flush();
  EXPECT_EQ(out, "\xEF\xBF\xBD");
}

}  // namespace
}  // namespace specontext
