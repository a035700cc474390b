// Shared setup of the sparse services tests: stories260K with a random retrieval head (random_head.h),
// the engine CLI's sparse output to compare with, a device limit that makes the planner offload layers,
// and /metrics helpers.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/services/random_head.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {

inline constexpr char kPrompt[] = "Once upon a time there was a little girl named Lily. She";

class SparseServices : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ModelDir();
    if (dir_.empty()) GTEST_FAIL() << "stories260K not found in models/";
    std::mt19937 rng(std::random_device{}());
    head_ = WriteRandomHead(rng);
  }
  void TearDown() override { std::filesystem::remove_all(head_); }

  std::vector<std::string> ModelArgs() const {
    return {"--model", dir_ + "/stories260K.bin", "--tokenizer", dir_ + "/tok512.bin", "--backend", "cpu",
            "--threads", "1", "--log-level", "warning"};
  }
  // The engine CLI's greedy text; `sparse_args` empty = dense.
  std::string Cli(const std::vector<std::string>& sparse_args, int max_new) const {
    std::vector<std::string> argv = {SPC_ENGINE_CLI_BIN, "generate", "--model", dir_ + "/stories260K.bin",
                                     "--tokenizer", dir_ + "/tok512.bin", "--backend", "cpu", "--prompt", kPrompt,
                                     "--max-new-tokens", std::to_string(max_new), "--temperature", "0",
                                     "--ignore-eos"};
    argv.insert(argv.end(), sparse_args.begin(), sparse_args.end());
    int code = -1;
    std::string out = RunCommand(argv, &code);
    EXPECT_EQ(code, 0);
    return out;
  }
  static v1::GenerateRequest Request(int max_new) {
    v1::GenerateRequest req;
    req.set_prompt(kPrompt);
    req.set_max_new_tokens(max_new);
    req.set_ignore_eos(true);
    return req;
  }
  std::vector<std::string> SparseCliArgs(int budget) const {
    return {"--sparse", "--retrieval-head", head_, "--budget", std::to_string(budget), "--sink", "1"};
  }

  // The smallest device limit (from a scan) under which the CLI's sparse run (B=8) offloads a layer;
  // *cli_out gets that run's text. Empty when none does.
  std::string OffloadLimit(int max_new, std::string* cli_out) const {
    std::string limit;
    // Above the planner's fixed bytes (weights plus the step bound of 512-token steps of one sequence, ~4 MB
    // here; the first limit that runs and offloads was 4096 KiB).
    for (int kib = 3584; kib <= 5120 && limit.empty(); kib += 32) {
      const std::string candidate = absl::StrCat(kib, "KiB");
      std::vector<std::string> argv = {"/bin/sh", "-c", "exec \"$@\" 2>&1", "sh", SPC_ENGINE_CLI_BIN, "generate",
                                       "--model", dir_ + "/stories260K.bin", "--tokenizer", dir_ + "/tok512.bin",
                                       "--backend", "cpu", "--prompt", kPrompt, "--max-new-tokens",
                                       std::to_string(max_new), "--temperature", "0", "--ignore-eos", "--sparse",
                                       "--retrieval-head", head_, "--budget", "8", "--sink", "1",
                                       "--gpu-memory-limit", candidate};
      int code = -1;
      const std::string out = RunCommand(argv, &code);
      if (code == 0 && out.find("offloaded_layers=0") == std::string::npos &&
          out.find("offloaded_layers=") != std::string::npos) {
        limit = candidate;
        *cli_out = out.substr(0, out.find("[summary]"));
      }
    }
    return limit;
  }

  std::string dir_, head_;
};

inline double Metric(int port, const std::string& name) {
  auto body = FetchMetrics(port);
  if (!body.ok()) return -1;
  auto v = MetricValue(*body, name);
  return v.ok() ? *v : -1;
}

// `promtool check metrics` on a /metrics body (skipped without promtool, Debian package prometheus).
inline void ExpectPromtoolAccepts(int port) {
  int code = -1;
  const std::string promtool = RunCommand({"/bin/sh", "-c", "command -v promtool"}, &code);
  if (code != 0 || promtool.empty()) return;
  auto body = FetchMetrics(port);
  ASSERT_TRUE(body.ok()) << body.status();
  const std::string path = absl::StrCat("/tmp/spc_sparse_metrics_", getpid(), "_", port, ".txt");
  std::ofstream(path) << *body;
  const std::string out = RunCommand({"/bin/sh", "-c", "promtool check metrics < " + path + " 2>&1"}, &code);
  EXPECT_EQ(code, 0) << out;
  std::filesystem::remove(path);
}

}  // namespace specontext::testing
