// Startup failures of the real binaries end the process with a non-zero exit and a message naming
// the problem, never with a server that runs half-started: a gRPC port another server listens on, a
// port file that cannot be written (and the port file of an earlier run, which goes first), a model
// path that is a FIFO.
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

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

// What a child run to its end left: its exit code (-1 when it was still running at the deadline and
// was killed) and everything it wrote to stdout and stderr.
struct Exited {
  int exit_code = -1;
  std::string output;
};

// Runs `argv` with its output in a pipe until it exits or `timeout_s` passes (then it is killed).
// `max_file_bytes` limits its regular-file writes (RLIMIT_FSIZE, which the pipe escapes; SIGXFSZ is
// ignored, so a write past the limit fails with EFBIG as one on a full disk fails with ENOSPC).
Exited RunToExit(const std::vector<std::string>& argv, double timeout_s,
                 rlim_t max_file_bytes = RLIM_INFINITY) {
  Exited result;
  int out[2];
  if (pipe(out) != 0) return result;
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    dup2(out[1], STDERR_FILENO);
    close(out[0]);
    close(out[1]);
    signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{max_file_bytes, max_file_bytes};
    setrlimit(RLIMIT_FSIZE, &limit);
    std::vector<char*> a;
    for (const auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execv(a[0], a.data());
    _exit(127);
  }
  close(out[1]);
  const absl::Time give_up = absl::Now() + absl::Seconds(timeout_s);
  while (true) {
    const int64_t left_ms = absl::ToInt64Milliseconds(give_up - absl::Now());
    if (left_ms <= 0) break;
    pollfd p{out[0], POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left_ms)) <= 0) continue;
    char buf[4096];
    const ssize_t n = read(out[0], buf, sizeof(buf));
    if (n <= 0) break;  // EOF: the child exited (or closed its output)
    result.output.append(buf, static_cast<size_t>(n));
  }
  close(out[0]);
  int status = 0;
  pid_t r = 0;
  while ((r = waitpid(pid, &status, WNOHANG)) == 0 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  if (r != pid) {  // still serving: the failure this test looks for
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return result;
  }
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

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

TEST_F(Startup, APortFileThatCannotBeWrittenIsAFailedStart) {
  for (const Binary& b : binaries_) {
    SCOPED_TRACE(b.name);
    char tmpl[] = "/tmp/spc_startup_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    RemoveOnExit dir{tmpl};
    const std::string port_file = dir.path + "/ports";
    std::vector<std::string> argv = {b.path};
    argv.insert(argv.end(), b.args.begin(), b.args.end());
    for (const char* a : {"--listen", "127.0.0.1:0", "--metrics-port", "0", "--metrics-host",
                          "127.0.0.1", "--port-file"}) {
      argv.push_back(a);
    }
    argv.push_back(port_file);

    const Exited run = RunToExit(argv, /*timeout_s=*/60, /*max_file_bytes=*/0);
    EXPECT_NE(run.exit_code, -1) << b.name << " kept running without its port file:\n"
                                 << run.output;
    EXPECT_NE(run.exit_code, 0) << run.output;
    EXPECT_THAT(run.output, HasSubstr("cannot write the port file " + port_file));
    EXPECT_THAT(run.output, HasSubstr("File too large"));
    // Neither a partial port file nor its temporary is left for a supervisor to read.
    EXPECT_TRUE(std::filesystem::is_empty(dir.path)) << "left in " << dir.path;
  }
}

TEST_F(Startup, AFailedStartRemovesTheEarlierRunsPortFile) {
  for (const Binary& b : binaries_) {
    SCOPED_TRACE(b.name);
    char tmpl[] = "/tmp/spc_startup_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    RemoveOnExit dir{tmpl};
    const std::string port_file = dir.path + "/ports";
    { std::ofstream(port_file) << "50051 9464\n"; }  // a dead server's ports
    std::vector<std::string> argv = {b.path};
    argv.insert(argv.end(), b.args.begin(), b.args.end());
    // The model (generator) or head (retriever) does not exist: the start fails after the flags parse.
    for (std::string& a : argv) {
      if (a.ends_with("stories260K.bin") || a == head_.path) a = dir.path + "/missing";
    }
    for (const char* a : {"--listen", "127.0.0.1:0", "--metrics-port", "0", "--port-file"}) argv.push_back(a);
    argv.push_back(port_file);

    const Exited run = RunToExit(argv, /*timeout_s=*/60);
    EXPECT_NE(run.exit_code, 0) << run.output;
    EXPECT_NE(run.exit_code, -1) << run.output;
    EXPECT_FALSE(std::filesystem::exists(port_file)) << "the stale port file is still there: " << ReadText(port_file);
  }
}

TEST_F(Startup, AModelThatIsAFifoIsRefusedAtOnce) {
  char tmpl[] = "/tmp/spc_startup_test_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  RemoveOnExit dir{tmpl};
  const std::string fifo = dir.path + "/model.bin";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  const std::string tokenizer = ModelDir() + "/tok512.bin";
  const Exited run =
      RunToExit({SPC_GENERATOR_BIN, "--model", fifo, "--tokenizer", tokenizer, "--backend", "cpu",
                 "--listen", "127.0.0.1:0", "--metrics-port", "0"},
                /*timeout_s=*/20);
  EXPECT_NE(run.exit_code, -1) << "the generator hung on a FIFO --model";
  EXPECT_NE(run.exit_code, 0);
  EXPECT_THAT(run.output, HasSubstr("FIFO"));
}

}  // namespace
}  // namespace specontext::testing
