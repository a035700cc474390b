// The host KV tier in the kvstore (--kvstore with offloaded layers): the offloaded layers' host copies live
// in the segment's blocks (spc_kvstore_host_tier_bytes is all of spc_host_kv_bytes while a request runs),
// the greedy text equals the engine CLI's run with plain pinned host memory (inproc and split mode), a
// finished request leaves no block behind, and a segment too small for a layer falls back to pinned memory
// (counted) without changing the text.
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tests/services/kvstore_segment.h"
#include "tests/services/sparse_fixture.h"

namespace specontext::testing {
namespace {

class KvstoreTier : public SparseServices, public ::testing::WithParamInterface<bool> {
 protected:
  // Generator flags: sparse (inproc, or split with `retriever`), B = 8, one sequence at a time, the device
  // limit that offloads layers, --kvstore `name` of `blocks` 1 KiB blocks.
  std::vector<std::string> Args(const std::string& limit, const std::string& name, int blocks,
                                const std::string& retriever) const {
    std::vector<std::string> a = ModelArgs();
    for (const std::string& s :
         {std::string("--budget"), std::string("8"), std::string("--sink"), std::string("1"),
          std::string("--max-batch"), std::string("1"), std::string("--gpu-memory-limit"), limit,
          std::string("--kvstore"), name, std::string("--kvstore-block-bytes"), std::string("1KiB"),
          std::string("--kvstore-blocks"), std::to_string(blocks), std::string("--retriever-deadline-ms"),
          std::string("5000")}) {
      a.push_back(s);
    }
    if (retriever.empty()) {
      for (const std::string& s :
           {std::string("--retriever"), std::string("inproc"), std::string("--retrieval-head"), head_}) {
        a.push_back(s);
      }
    } else {
      a.push_back("--retriever");
      a.push_back(retriever);
    }
    return a;
  }
};

TEST_P(KvstoreTier, HostTierLivesInTheSegmentAndTextMatches) {
  const bool split = GetParam();
  const int kNew = 60;
  std::string cli_out;
  const std::string limit = OffloadLimit(kNew, &cli_out);
  ASSERT_FALSE(limit.empty());
  ServerProcess ret;
  if (split) ASSERT_TRUE(ret.Start(SPC_RETRIEVER_BIN, {"--head", head_, "--log-level", "warning"}).ok());
  SegmentGuard seg("spc_tier_test_");
  ServerProcess gen;
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, Args(limit, seg.name, 8192, split ? ret.address() : "")).ok());
  const int port = gen.metrics_port();
  if (split) {
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (Metric(port, "spc_retriever_connected") != 1 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(50));
    }
    ASSERT_EQ(Metric(port, "spc_retriever_connected"), 1);
  }
  // Long requests in the background; while one runs with offloaded layers, every host KV byte is a
  // segment byte (a pinned host tier would show as host bytes outside the segment).
  std::atomic<bool> stop{false};
  std::thread client([&] {
    auto stub = GeneratorStub(gen.address());
    // The limit is the CLI's (in-process: its planner also counts the head's K cache rows) for kNew tokens:
    // in-process requests of kNew just fit with layers offloaded, longer ones would not be admitted. The
    // split generator holds no head cache, so its sequences must be longer to cross the same threshold.
    while (!stop) CallGenerate(stub.get(), Request(split ? 400 : kNew), 60);
  });
  double tier = 0, host = -1, offloaded = 0;
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (absl::Now() < give_up) {
    auto body = FetchMetrics(port);
    if (body.ok()) {
      tier = MetricValue(*body, "spc_kvstore_host_tier_bytes").value_or(0);
      host = MetricValue(*body, "spc_host_kv_bytes").value_or(-1);
      offloaded = MetricValue(*body, "spc_offloaded_layers").value_or(0);
      if (tier > 0 && offloaded > 0 && host == tier) break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  stop = true;
  client.join();
  EXPECT_GT(offloaded, 0) << "limit " << limit << "; generator log:\n" << std::ifstream(gen.log_path()).rdbuf();
  EXPECT_GT(tier, 0);
  EXPECT_EQ(host, tier) << "host KV bytes outside the kvstore segment";
  // The text equals the CLI's run with pinned host memory, and nothing stays in the segment after it.
  StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), Request(kNew));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", cli_out) << "limit " << limit;
  // In-process the limit was calibrated for this request to need offloaded layers; the split generator holds
  // no head cache, so once the long background requests are gone its layers came back to the device.
  EXPECT_EQ(r.final.sparsity().offloaded_layers() > 0, !split) << r.final.sparsity().offloaded_layers();
  if (split) EXPECT_GT(Metric(port, "spc_kv_layer_returns_total"), 0);
  EXPECT_EQ(r.final.sparsity().fallback_steps(), 0);
  EXPECT_EQ(Metric(port, "spc_kvstore_host_tier_fallbacks_total"), 0);
  EXPECT_EQ(Metric(port, "spc_kvstore_errors_total"), 0);
  EXPECT_EQ(Metric(port, "spc_kvstore_host_tier_bytes"), 0);
  nlohmann::json idle = Inspect(seg.name);
  ASSERT_TRUE(idle.is_object());
  EXPECT_EQ(idle["usage"]["used_blocks"].get<int64_t>(), 0) << idle.dump();
  EXPECT_EQ(idle["usage"]["sequences"].get<int64_t>(), 0) << idle.dump();
  ExpectPromtoolAccepts(port);
  gen.Signal(SIGTERM);
  EXPECT_EQ(gen.WaitExit(30).value_or(-1), 0) << std::ifstream(gen.log_path()).rdbuf();
}

INSTANTIATE_TEST_SUITE_P(Modes, KvstoreTier, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Split" : "Inproc"; });

// A segment with fewer blocks than one layer's copy needs: the tier goes to pinned memory (counted), the
// request and its text are unchanged.
TEST_F(SparseServices, KvstoreTooSmallFallsBackToPinned) {
  const int kNew = 60;
  std::string cli_out;
  const std::string limit = OffloadLimit(kNew, &cli_out);
  ASSERT_FALSE(limit.empty());
  SegmentGuard seg("spc_tier_test_");
  std::vector<std::string> args = ModelArgs();
  for (const std::string& s :
       {std::string("--retriever"), std::string("inproc"), std::string("--retrieval-head"), head_,
        std::string("--budget"), std::string("8"), std::string("--sink"), std::string("1"), std::string("--max-batch"),
        std::string("1"), std::string("--gpu-memory-limit"), limit, std::string("--kvstore"), seg.name,
        std::string("--kvstore-block-bytes"), std::string("1KiB"), std::string("--kvstore-blocks"), std::string("4")}) {
    args.push_back(s);
  }
  ServerProcess gen;
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
  StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), Request(kNew));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", cli_out);
  EXPECT_GT(r.final.sparsity().offloaded_layers(), 0);
  EXPECT_GT(Metric(gen.metrics_port(), "spc_kvstore_host_tier_fallbacks_total"), 0);
  nlohmann::json idle = Inspect(seg.name);
  ASSERT_TRUE(idle.is_object());
  EXPECT_EQ(idle["usage"]["used_blocks"].get<int64_t>(), 0) << idle.dump();
  gen.Signal(SIGTERM);
  EXPECT_EQ(gen.WaitExit(30).value_or(-1), 0);
}

}  // namespace
}  // namespace specontext::testing
