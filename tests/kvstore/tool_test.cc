// specontext-kvstore CLI: create / inspect (text and JSON, liveness) / reclaim / remove, and its
// errors and exit codes.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/kvstore/test_util.h"

namespace specontext::kvstore {
namespace {

using ::specontext::kvstore::testing::FreshSeed;
using ::specontext::kvstore::testing::Options;
using ::specontext::kvstore::testing::ScopedSegmentName;
using ::testing::HasSubstr;

struct RunResult {
  int rc = -1;
  std::string out;
  std::string err;
};

std::string Slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

RunResult RunTool(const std::string& args) {
  const std::string base = ::testing::TempDir() + "kvtool_" + std::to_string(::getpid());
  const std::string cmd =
      std::string(SPC_KVSTORE_TOOL) + " " + args + " >" + base + ".out 2>" + base + ".err";
  const int status = std::system(cmd.c_str());
  RunResult r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = Slurp(base + ".out");
  r.err = Slurp(base + ".err");
  std::remove((base + ".out").c_str());
  std::remove((base + ".err").c_str());
  return r;
}

TEST(KvstoreToolTest, CreateInspectRemove) {
  ScopedSegmentName name("tool");
  std::mt19937_64 rng(FreshSeed());
  const uint64_t blocks = 5 + rng() % 100;
  const uint64_t bytes = 64 * (1 + rng() % 32);
  RunResult r = RunTool("create --name " + name.str() + " --blocks " + std::to_string(blocks) +
                        " --block-size " + std::to_string(bytes));
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("created /" + name.str()));
  r = RunTool("create --name " + name.str() + " --blocks 4 --block-size 64");
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("File exists"));
  r = RunTool("inspect --name " + name.str());
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("blocks: " + std::to_string(blocks) + " total, 0 used"));
  EXPECT_THAT(r.out, HasSubstr("owners\n  (none)"));
  r = RunTool("inspect --json --name " + name.str());
  ASSERT_EQ(r.rc, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["header"]["block_count"], blocks);
  EXPECT_EQ(j["header"]["block_bytes"], bytes);
  EXPECT_EQ(j["usage"]["free_blocks"], blocks);
  r = RunTool("remove --name " + name.str());
  EXPECT_EQ(r.rc, 0) << r.err;
  r = RunTool("remove --name " + name.str());
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("No such file"));
  r = RunTool("inspect --name " + name.str());
  EXPECT_EQ(r.rc, 1);
}

TEST(KvstoreToolTest, UsageAndInputErrors) {
  ScopedSegmentName name("toolerr");
  RunResult r = RunTool("");
  EXPECT_EQ(r.rc, 2);
  EXPECT_THAT(r.err, HasSubstr("usage:"));
  r = RunTool("frobnicate --name " + name.str());
  EXPECT_EQ(r.rc, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown command"));
  r = RunTool("create --blocks 4 --block-size 64");
  EXPECT_EQ(r.rc, 2);
  EXPECT_THAT(r.err, HasSubstr("--name is required"));
  r = RunTool("create --name " + name.str() + " --blocks many --block-size 64");
  EXPECT_EQ(r.rc, 2);
  r = RunTool("create --name " + name.str() + " --blocks 4 --block-size 100");
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("multiple of 64"));
  r = RunTool("create --name " + name.str() + " --blocks 4 --block-size");
  EXPECT_EQ(r.rc, 2);
  r = RunTool("inspect --name " + name.str() + " --verbose");
  EXPECT_EQ(r.rc, 2);
  r = RunTool("create --name bad/name --blocks 4 --block-size 64");
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("must not contain '/'"));
  r = RunTool("create --name " + name.str() + " --blocks 4 --block-size 1K --huge-pages");
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("huge pages"));
}

TEST(KvstoreToolTest, InspectShowsDeadOwnerAndReclaimFreesIt) {
  ScopedSegmentName name("toolown");
  auto live = KvStore::Open(Options(name.str(), 32, 64));
  ASSERT_TRUE(live.ok()) << live.status();
  ASSERT_TRUE((*live)->Allocate(1, 2).ok());
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    auto s = KvStore::Open(Options(name.str(), 32, 64, OpenMode::kAttach));
    if (s.ok() && (*s)->Allocate(9, 11).ok()) (void)!::write(pipefd[1], "k", 1);
    for (;;) ::pause();
  }
  char c = 0;
  ASSERT_EQ(::read(pipefd[0], &c, 1), 1);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  RunResult r = RunTool("inspect --json --name " + name.str());
  ASSERT_EQ(r.rc, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["owners"].size(), 2u);
  int dead = 0;
  for (const auto& o : j["owners"]) dead += o["alive"] == false;
  EXPECT_EQ(dead, 1);
  EXPECT_EQ(j["usage"]["used_blocks"], 13);  // inspect only looks
  r = RunTool("reclaim --name " + name.str());
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("reclaimed 11 blocks, 1 sequences, 1 owners"));
  auto stats = (*live)->Stats();
  EXPECT_EQ(stats->used_blocks, 2u);
  EXPECT_EQ(stats->owners, 1u);
}

}  // namespace
}  // namespace specontext::kvstore
