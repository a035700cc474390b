// Per-client limits of the generator: one client (peer address without port) may hold at most
// --max-requests-per-peer calls (more: RESOURCE_EXHAUSTED naming the flag), and admission is round-robin
// by client, so a short request from another client is admitted at the next free batch slot instead of
// behind a flood. Order is checked by counting the flood's finished calls, never by time.
#include <atomic>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

std::vector<std::string> ModelArgs(const std::string& dir) {
  return {"--model", dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin", "--backend", "cpu",
          "--threads", "1", "--log-level", "warning", "--max-batch", "1"};
}

v1::GenerateRequest Long(int tokens) {
  v1::GenerateRequest req;
  req.set_prompt("Once upon a time");
  req.set_max_new_tokens(tokens);
  req.set_ignore_eos(true);
  return req;
}

TEST(GeneratorPeerLimits, OneClientPastItsCapGetsResourceExhausted) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  std::vector<std::string> args = ModelArgs(dir);
  for (const char* a : {"--max-requests-per-peer", "3", "--max-queue", "64"}) args.push_back(a);
  ServerProcess server;
  absl::Status st = server.Start(SPC_GENERATOR_BIN, args);
  ASSERT_TRUE(st.ok()) << st;
  auto stub = GeneratorStub(server.address());
  constexpr int kCalls = 12;
  std::vector<StreamResult> results(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] { results[i] = CallGenerate(stub.get(), Long(400)); });
  }
  for (auto& t : threads) t.join();
  int ok = 0, refused = 0;
  for (const StreamResult& r : results) {
    if (r.status.ok()) {
      ++ok;
      EXPECT_EQ(r.tokens.size(), 400u);
    } else {
      ++refused;
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << r.status.error_message();
      EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr("--max-requests-per-peer"));
      EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr("127.0.0.1"));
    }
  }
  EXPECT_GE(ok, 3);
  EXPECT_GE(refused, 1) << "12 calls of 400 tokens at once never had more than 3 in flight";
  // Served again once its calls are done.
  EXPECT_TRUE(CallGenerate(stub.get(), Long(3)).status.ok());
}

// --max-streams-per-connection: calls past it on one connection wait in the client's transport instead
// of reaching the server, so with two streams, one batch slot and two queue places no call of a burst on
// one channel is refused (without the limit the burst overflows the queue: RESOURCE_EXHAUSTED). Two queue
// places, not one: a call's stream closes when its handler returns, and the next call may arrive before
// the engine's next step admits the one queued behind it.
TEST(GeneratorPeerLimits, StreamsPastTheConnectionLimitWaitInTheClient) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  std::vector<std::string> args = ModelArgs(dir);
  for (const char* a : {"--max-queue", "2", "--max-streams-per-connection", "2"}) args.push_back(a);
  ServerProcess server;
  absl::Status st = server.Start(SPC_GENERATOR_BIN, args);
  ASSERT_TRUE(st.ok()) << st;
  auto stub = GeneratorStub(server.address());
  constexpr int kCalls = 8;
  std::vector<StreamResult> results(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] { results[i] = CallGenerate(stub.get(), Long(200)); });
  }
  for (auto& t : threads) t.join();
  for (const StreamResult& r : results) {
    EXPECT_TRUE(r.status.ok()) << r.status.error_code() << " " << r.status.error_message();
    EXPECT_EQ(r.tokens.size(), 200u);
  }
}

TEST(GeneratorPeerLimits, AShortRequestIsAdmittedAheadOfAnotherClientsFlood) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  // Two clients on one host: one over IPv4, one over IPv6 loopback (a dual-stack listener).
  std::vector<std::string> args = ModelArgs(dir);
  for (const char* a : {"--max-queue", "64"}) args.push_back(a);
  ServerProcess server;
  absl::Status st = server.Start(SPC_GENERATOR_BIN, args, 60, "[::]:0");
  if (!st.ok()) GTEST_SKIP() << "no IPv6 loopback here: " << st;
  auto flood_stub = GeneratorStub("127.0.0.1:" + std::to_string(server.grpc_port()));
  auto other_stub = GeneratorStub("[::1]:" + std::to_string(server.grpc_port()));
  constexpr int kFlood = 8;
  std::atomic<int> flood_done{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kFlood; ++i) {
    threads.emplace_back([&] {
      const StreamResult r = CallGenerate(flood_stub.get(), Long(400));
      EXPECT_TRUE(r.status.ok()) << r.status.error_message();
      ++flood_done;
    });
  }
  // Wait until the flood is queued: one running, the rest waiting.
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  double queued = 0;
  while (absl::Now() < give_up) {
    auto body = FetchMetrics(server.metrics_port());
    ASSERT_TRUE(body.ok());
    queued = MetricValue(*body, "spc_generator_queue_depth").value_or(0);
    if (queued >= kFlood - 2) break;
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_GE(queued, kFlood - 2) << "the flood never queued";
  const int done_before = flood_done.load();
  v1::GenerateRequest brief = Long(16);
  const StreamResult r = CallGenerate(other_stub.get(), brief);
  const int done_after = flood_done.load();
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens.size(), 16u);
  // Round-robin: admitted when the running flood call finishes (one more flood call done at most, two if
  // a second had just been admitted when it arrived); first come first served would have run the whole
  // queue (6 or 7 calls) first.
  EXPECT_LE(done_after - done_before, 2) << "the short request waited behind the flood";
  for (auto& t : threads) t.join();
  EXPECT_EQ(flood_done.load(), kFlood);
}

}  // namespace
}  // namespace specontext::testing
