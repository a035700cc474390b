// `promtool check metrics` (Debian package prometheus) accepts what Registry::Serialize() writes,
// and rejects a broken exposition (so the check can fail). Skipped when promtool is not installed.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>

#include "core/metrics/metrics.h"
#include "gtest/gtest.h"

namespace specontext::metrics {
namespace {

bool HavePromtool() { return std::system("command -v promtool >/dev/null 2>&1") == 0; }

// Runs `promtool check metrics` on `text`; returns its exit code, fills its output.
int PromtoolCheck(const std::string& text, std::string* output) {
  const std::string base = ::testing::TempDir() + "promtool_" + std::to_string(::getpid());
  std::ofstream(base + ".prom") << text;
  const std::string cmd = "promtool check metrics < " + base + ".prom > " + base + ".out 2>&1";
  const int status = std::system(cmd.c_str());
  std::ifstream in(base + ".out");
  output->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(PromtoolTest, SerializedRegistryPassesLint) {
  if (!HavePromtool()) GTEST_SKIP() << "promtool not found (apt-get install prometheus)";
  std::mt19937_64 rng(std::random_device{}());
  Registry reg;
  auto* req = *reg.AddCounter("spc_requests_total", "Requests by gRPC status code.", {"code"});
  auto* bytes = *reg.AddCounter("spc_kv_bytes_loaded_total", "KV bytes copied to the GPU.");
  auto* mem = *reg.AddGauge("spc_memory_bytes", "Memory by kind.", {"device", "kind"});
  auto* ttft =
      *reg.AddHistogram("spc_ttft_seconds", "Time to first token.", {}, LatencyBucketsSeconds());
  (*req->WithLabels({"OK"}))->Increment(rng() % 1000);
  (*req->WithLabels({"INVALID_ARGUMENT"}))->Increment(rng() % 1000);
  (*bytes->WithLabels({}))->Increment(static_cast<double>(rng() % (1ull << 40)));
  (*mem->WithLabels({"gpu", "kv \"cache\"\n"}))->Set(static_cast<double>(rng() % (1ull << 34)));
  for (int i = 0; i < 100; ++i) (*ttft->WithLabels({}))->Observe((rng() % 100000) / 1000.0);
  std::string out;
  EXPECT_EQ(PromtoolCheck(reg.Serialize(), &out), 0) << out << "\n" << reg.Serialize();
  EXPECT_EQ(out, "");  // no lint warnings either
}

TEST(PromtoolTest, BrokenExpositionFails) {
  if (!HavePromtool()) GTEST_SKIP() << "promtool not found (apt-get install prometheus)";
  std::string out;
  EXPECT_NE(PromtoolCheck("# TYPE x counter\nx{a=\"unterminated} 1\n", &out), 0);
}

}  // namespace
}  // namespace specontext::metrics
