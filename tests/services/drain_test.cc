// SIGTERM drains the generator: calls in flight finish with all their tokens, new calls are
// refused, and the process exits 0.
#include <signal.h>

#include <thread>

#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

TEST(GeneratorDrain, SigtermFinishesInFlightCallsThenExitsZero) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  ServerProcess server;
  ASSERT_TRUE(server.Start(SPC_GENERATOR_BIN, {"--model", dir + "/stories260K.bin", "--tokenizer",
                                              dir + "/tok512.bin", "--backend", "cpu", "--threads", "1",
                                              "--log-level", "info"})
                  .ok());
  auto stub = GeneratorStub(server.address());
  constexpr int kCalls = 4;
  constexpr int kTokens = 300;
  std::vector<StreamResult> results(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest req;
      req.set_prompt(i % 2 ? "Once upon a time" : "The little dog");
      req.set_max_new_tokens(kTokens);
      req.set_ignore_eos(true);
      results[i] = CallGenerate(stub.get(), req);
    });
  }
  // Wait until every call is running, then ask the server to stop.
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (absl::Now() < give_up) {
    auto body = FetchMetrics(server.metrics_port());
    if (body.ok() && MetricValue(*body, "spc_generator_active_calls").value_or(0) == kCalls) break;
    absl::SleepFor(absl::Milliseconds(5));
  }
  server.Signal(SIGTERM);
  absl::SleepFor(absl::Milliseconds(50));
  // A new call during the drain is refused (UNAVAILABLE, whether by the service or the closed port).
  StreamResult late;
  v1::GenerateRequest req;
  req.set_prompt("Once");
  req.set_max_new_tokens(2);
  late = CallGenerate(stub.get(), req, 5);
  for (auto& t : threads) t.join();
  for (int i = 0; i < kCalls; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(static_cast<int>(results[i].tokens.size()), kTokens);
    EXPECT_TRUE(results[i].final.done());
  }
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::UNAVAILABLE) << late.status.error_message();
  auto code = server.WaitExit(30);
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 0);
}

}  // namespace
}  // namespace specontext::testing
