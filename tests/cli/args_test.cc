// Args (core/cli/args.h): --help and -h ask for the usage wherever they stand, a flag's value that
// reads
// "--help" is a value, and the usage tells each default once.
#include "core/cli/args.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"

namespace specontext {
namespace {

// Parses `words` (after a program name) into `args`.
absl::Status ParseWords(Args& args, std::vector<std::string> words) {
  words.insert(words.begin(), "prog");
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  return args.Parse(static_cast<int>(argv.size()), argv.data());
}

Args Flags() {
  Args a;
  a.Define({"prompt", "prompt text", false, false, ""});
  a.Define({"temperature", "0 = greedy (default: generation_config.json's when it samples, else 0)",
            false, false, "0"});
  a.Define({"max-new-tokens", "tokens to generate at most", false, false, "128"});
  a.Define({"ignore-eos", "keep going", true, false, ""});
  return a;
}

TEST(Args, HelpAndShortHelp) {
  for (const std::vector<std::string>& words : std::vector<std::vector<std::string>>{
           {"--help"}, {"-h"}, {"--max-new-tokens", "3", "--help"}}) {
    Args a = Flags();
    ASSERT_TRUE(ParseWords(a, words).ok()) << words[0];
    EXPECT_TRUE(a.help_requested()) << words[0];
    EXPECT_TRUE(a.positional().empty());
  }
  Args a = Flags();
  ASSERT_TRUE(ParseWords(a, {"--max-new-tokens", "3"}).ok());
  EXPECT_FALSE(a.help_requested());
}

TEST(Args, HelpWinsOverAnEarlierMistake) {
  Args a = Flags();
  EXPECT_TRUE(ParseWords(a, {"--bogus", "--help"}).ok());
  EXPECT_TRUE(a.help_requested());
  Args b = Flags();
  EXPECT_TRUE(ParseWords(b, {"--ignore-eos=maybe", "-h"}).ok());
  EXPECT_TRUE(b.help_requested());
  Args c = Flags();
  const absl::Status st = ParseWords(c, {"--bogus"});
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(absl::StrContains(st.message(), "unknown flag --bogus")) << st;
}

TEST(Args, HelpAsAFlagValueIsAValue) {
  Args a = Flags();
  ASSERT_TRUE(ParseWords(a, {"--prompt", "--help"}).ok());
  EXPECT_FALSE(a.help_requested());
  EXPECT_EQ(a.GetString("prompt"), "--help");
}

TEST(Args, UsageTellsEachDefaultOnce) {
  const std::string usage = Flags().Usage();
  for (absl::string_view line : absl::StrSplit(usage, '\n')) {
    const size_t first = line.find("(default");
    if (first != absl::string_view::npos) {
      EXPECT_EQ(line.find("(default", first + 1), absl::string_view::npos) << line;
    }
  }
  EXPECT_TRUE(absl::StrContains(usage, "tokens to generate at most (default: 128)")) << usage;
  EXPECT_TRUE(
      absl::StrContains(usage, "(default: generation_config.json's when it samples, else 0)\n"))
      << usage;
}

TEST(Args, CommandUsageNamesTheCommand) {
  const std::string usage = CommandUsage("specontext generate", Flags());
  EXPECT_TRUE(absl::StartsWith(usage, "usage: specontext generate [flags]\n")) << usage;
  EXPECT_TRUE(absl::StrContains(usage, "--max-new-tokens VALUE")) << usage;
}

}  // namespace
}  // namespace specontext
