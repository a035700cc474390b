// Startup failures of the real binaries end the process with a non-zero exit and a message naming
// the problem, never with a server that runs half-started: a gRPC port another server listens on.
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/services/random_head.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

using ::testing::HasSubstr;

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The flags that start each binary on the stories260K model or on a random head shaped for it.
struct Binary {
  std::string name;
  std::string path;
  std::vector<std::string> args;
};

class Startup : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = ModelDir();
    if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
    std::mt19937 rng(std::random_device{}());
    head_.path = WriteRandomHead(rng);
    binaries_ = {
        {"generator",
         SPC_GENERATOR_BIN,
         {"--model", dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin", "--backend",
          "cpu", "--threads", "1", "--log-level", "warning"}},
        {"retriever", SPC_RETRIEVER_BIN, {"--head", head_.path, "--log-level", "warning"}},
    };
  }

  RemoveOnExit head_;
  std::vector<Binary> binaries_;
};

TEST_F(Startup, ASecondServerOnABusyPortFailsAndTheFirstKeepsServing) {
  for (const Binary& b : binaries_) {
    SCOPED_TRACE(b.name);
    ServerProcess first;
    ASSERT_TRUE(first.Start(b.path, b.args).ok());
    const std::string busy = first.address();

    ServerProcess second;
    const absl::Status started = second.Start(b.path, b.args, 60, busy);
    EXPECT_FALSE(started.ok()) << "a second " << b.name << " started on " << busy;
    const absl::StatusOr<int> code = second.WaitExit(30);
    ASSERT_TRUE(code.ok()) << code.status();
    EXPECT_NE(*code, 0);
    EXPECT_THAT(ReadText(second.log_path()), HasSubstr(absl::StrCat("cannot listen on ", busy)));

    ASSERT_TRUE(first.Running());
    auto channel = grpc::CreateChannel(busy, grpc::InsecureChannelCredentials());
    EXPECT_TRUE(
        channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)));
  }
}

}  // namespace
}  // namespace specontext::testing
