// Golden test: our encode/decode of every string in strings.jsonl equals HF `tokenizers` (Python),
// recorded by tools/reference/make_tokenizer_vectors.py into
// tests/data/tokenizers/expected_<name>.jsonl. A missing expected file is a failure, not a skip.
#include <cstdlib>
#include <fstream>

#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/test_strings.h"

namespace specontext {
namespace {

// Test-only override to compare against vectors kept elsewhere (e.g. a fresh run of the script).
std::string ExpectedDir() {
  const char* dir = std::getenv("SPC_TOKENIZER_EXPECTED_DIR");
  return dir != nullptr ? dir : std::string(SPECONTEXT_TEST_DATA) + "/tokenizers";
}

class HfVectorsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(HfVectorsTest, MatchesHfTokenizers) {
  const std::string name = GetParam();
  auto tok =
      LoadHfTokenizer(std::string(SPECONTEXT_TOKENIZER_DIR) + "/" + name + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<std::string> strings = testing::ReadTestStrings(SPECONTEXT_TOKENIZER_STRINGS);
  ASSERT_GE(strings.size(), 320u);

  const std::string expected_path = ExpectedDir() + "/expected_" + name + ".jsonl";
  std::ifstream in(expected_path);
  ASSERT_TRUE(in.good()) << "missing " << expected_path
                         << ": run tools/reference/make_tokenizer_vectors.py on the GPU machine";
  std::string line;
  size_t i = 0, id_mismatches = 0, decode_mismatches = 0;
  for (; std::getline(in, line); ++i) {
    ASSERT_LT(i, strings.size()) << "expected file has more lines than strings.jsonl";
    const auto exp = nlohmann::json::parse(line);
    const auto ids_exp = exp["ids"].get<std::vector<int32_t>>();
    auto ids = (*tok)->Encode(strings[i], /*add_bos=*/false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    if (*ids != ids_exp) {
      ++id_mismatches;
      ADD_FAILURE() << name << " string " << i << " "
                    << nlohmann::json(strings[i])
                           .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                    << "\n  got      " << nlohmann::json(*ids).dump() << "\n  expected "
                    << nlohmann::json(ids_exp).dump();
    }
    // Decode the reference ids, so decoding is checked independently of encoding.
    const std::string dec = (*tok)->Decode(ids_exp, /*skip_special=*/false);
    const std::string dec_skip = (*tok)->Decode(ids_exp, /*skip_special=*/true);
    if (dec != exp["decoded"].get<std::string>() ||
        dec_skip != exp["decoded_skip"].get<std::string>()) {
      ++decode_mismatches;
      ADD_FAILURE() << name << " decode of string " << i << ": got " << nlohmann::json(dec).dump()
                    << " / " << nlohmann::json(dec_skip).dump() << ", expected "
                    << exp["decoded"].dump() << " / " << exp["decoded_skip"].dump();
    }
  }
  EXPECT_EQ(i, strings.size()) << "expected file and strings.jsonl differ in length";
  EXPECT_EQ(id_mismatches, 0u);
  EXPECT_EQ(decode_mismatches, 0u);
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, HfVectorsTest, ::testing::Values("qwen3", "llama3"));

}  // namespace
}  // namespace specontext
