// Test harness: runs the real service binaries on loopback (ports picked by the server: port 0 and
// --port-file), and small helpers to call them and read their /metrics.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/statusor.h"
#include "proto/specontext.grpc.pb.h"

namespace specontext::testing {

/// The embedded stories260K model folder (models/stories260K); empty when absent.
std::string ModelDir();

/// One child process running a service binary with --listen 127.0.0.1:0 --metrics-port 0.
class ServerProcess {
 public:
  ~ServerProcess();
  /// Starts `binary` with `args` (plus the listen/port-file flags) and waits until it serves.
  /// `listen` is the gRPC address (a fixed port lets a restarted server take its predecessor's place).
  absl::Status Start(const std::string& binary, std::vector<std::string> args, double timeout_s = 60,
                     const std::string& listen = "127.0.0.1:0");
  /// The child's pid (-1 when none).
  pid_t pid() const { return pid_; }
  /// Sends `sig`; WaitExit() returns the exit code (or 128 + signal), also for a child that
  /// already exited (a failed Start() included).
  void Signal(int sig);
  absl::StatusOr<int> WaitExit(double timeout_s);
  bool Running();

  std::string address() const { return "127.0.0.1:" + std::to_string(grpc_port_); }
  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  /// The OpenAI-compatible HTTP port (generator started with --http-port), else 0.
  int http_port() const { return http_port_; }
  const std::string& log_path() const { return log_path_; }

 private:
  pid_t pid_ = -1;
  int exit_code_ = -1;  // once the child was reaped
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  int http_port_ = 0;
  std::string dir_;
  std::string log_path_;
};

std::unique_ptr<v1::Generator::Stub> GeneratorStub(const std::string& address);

/// Removes a file or folder when it goes out of scope, so a test leaves nothing in /tmp on any exit path
/// (a failed ASSERT returning early included).
struct RemoveOnExit {
  std::string path;
  ~RemoveOnExit();
};

/// The body of GET /metrics.
absl::StatusOr<std::string> FetchMetrics(int port);
/// Value of the sample `name_with_labels` (e.g. `spc_device_memory_bytes{kind="kv_cache"}`).
absl::StatusOr<double> MetricValue(const std::string& body, const std::string& name_with_labels);
/// Waits (20 s at most) until the generator serving /metrics on `metrics_port` holds no running or queued
/// request, no KV memory and no active call (every request's state was freed); fails the test naming the
/// values otherwise.
void ExpectGeneratorStateFreed(int metrics_port);

/// Runs a command, returns its stdout; the exit code goes to *exit_code.
std::string RunCommand(const std::vector<std::string>& argv, int* exit_code);

struct StreamResult {
  std::vector<int32_t> tokens;
  std::string text;
  v1::GenerateResponse final;  // the done message
  int messages = 0;
  grpc::Status status;
};
StreamResult CallGenerate(v1::Generator::Stub* stub, const v1::GenerateRequest& req, double timeout_s = 120);

/// A suite whose tests share one generator process: the derived suite's SetUpTestSuite calls
/// StartSharedServer with the generator binary and its flags; the server stops after the suite. Every test
/// fails (not skips) without the embedded stories260K model; a derived SetUp calls this SetUp first and
/// returns on HasFatalFailure().
class SharedGeneratorSuite : public ::testing::Test {
 protected:
  static void StartSharedServer(const std::string& binary, const std::vector<std::string>& args) {
    if (ModelDir().empty()) return;
    server_ = new ServerProcess();
    const absl::Status st = server_->Start(binary, args);
    ASSERT_TRUE(st.ok()) << st;
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    if (ModelDir().empty()) GTEST_FAIL() << "stories260K not found in models/";
    ASSERT_NE(server_, nullptr);
  }

  static inline ServerProcess* server_ = nullptr;
};

}  // namespace specontext::testing
