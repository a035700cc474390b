// The service binaries answer --help and -h with their usage on stdout and exit 0, without
// starting.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "tests/common/cli_runner.h"

namespace specontext {
namespace {

void ExpectUsage(const std::string& binary, const std::vector<std::string>& words,
                 const std::string& usage, const std::string& flag) {
  const testing::CliRun r = testing::RunCli(binary, words);
  const std::string line = binary + " " + absl::StrJoin(words, " ");
  EXPECT_FALSE(r.signaled) << line;
  EXPECT_EQ(r.exit_code, 0) << line << ": " << r.err;
  EXPECT_TRUE(absl::StartsWith(r.out, usage)) << line << ": " << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, flag)) << line << ": " << r.out;
}

TEST(ServiceHelp, Generator) {
  for (const std::string help : {"--help", "-h"}) {
    ExpectUsage(SPC_GENERATOR_BIN, {help}, "usage: specontext-generator [flags]", "--listen VALUE");
  }
}

#ifdef SPC_RETRIEVER_BIN
TEST(ServiceHelp, Retriever) {
  for (const std::string help : {"--help", "-h"}) {
    ExpectUsage(SPC_RETRIEVER_BIN, {help}, "usage: specontext-retriever [flags]", "--listen VALUE");
  }
}
#endif

TEST(ServiceHelp, ClientAndLoadgen) {
  for (const std::string help : {"--help", "-h"}) {
    ExpectUsage(SPC_CLIENT_BIN, {help}, "usage: specontext-client generate|info",
                "generate --help");
    ExpectUsage(SPC_CLIENT_BIN, {"generate", help}, "usage: specontext-client generate [flags]",
                "--addr VALUE");
    ExpectUsage(SPC_CLIENT_BIN, {"info", help}, "usage: specontext-client info [flags]",
                "--addr VALUE");
    ExpectUsage(SPC_LOADGEN_BIN, {help}, "usage: specontext-loadgen [flags]",
                "--concurrency VALUE");
  }
}

}  // namespace
}  // namespace specontext
