// Admission control: with one running slot and a queue of two, a burst of long requests gets
// RESOURCE_EXHAUSTED for the overflow while every admitted request completes in full.
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

TEST(GeneratorAdmission, FullQueueRejectsAndAdmittedRequestsComplete) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  ServerProcess server;
  absl::Status st = server.Start(SPC_GENERATOR_BIN, {"--model", dir + "/stories260K.bin", "--tokenizer",
                                                     dir + "/tok512.bin", "--backend", "cpu", "--threads", "1",
                                                     "--log-level", "warning", "--max-batch", "1", "--max-queue",
                                                     "2"});
  ASSERT_TRUE(st.ok()) << st;
  auto stub = GeneratorStub(server.address());
  constexpr int kCalls = 10;
  constexpr int kTokens = 400;
  std::vector<StreamResult> results(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest req;
      req.set_prompt("Once upon a time");
      req.set_max_new_tokens(kTokens);
      req.set_ignore_eos(true);
      results[i] = CallGenerate(stub.get(), req);
    });
  }
  for (auto& t : threads) t.join();
  int ok = 0, rejected = 0;
  for (const StreamResult& r : results) {
    if (r.status.ok()) {
      ++ok;
      EXPECT_EQ(static_cast<int>(r.tokens.size()), kTokens);
    } else {
      ++rejected;
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << r.status.error_message();
      EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr("queue is full"));
      EXPECT_TRUE(r.tokens.empty());
    }
  }
  EXPECT_GE(ok, 1);
  EXPECT_GE(rejected, 1);
  auto body = FetchMetrics(server.metrics_port());
  ASSERT_TRUE(body.ok());
  EXPECT_EQ(MetricValue(*body, "spc_generator_requests_total{code=\"RESOURCE_EXHAUSTED\"}").value_or(-1), rejected);
  // Served again once the burst is over.
  v1::GenerateRequest req;
  req.set_prompt("Once");
  req.set_max_new_tokens(3);
  EXPECT_TRUE(CallGenerate(stub.get(), req).status.ok());
}

// --max-kv-bytes: a request whose dense KV reservation (prompt + max_new_tokens) cannot fit the budget is
// refused with RESOURCE_EXHAUSTED naming the flag and what would fit; smaller ones are served.
TEST(GeneratorAdmission, KvBudgetRefusesWhatCannotFit) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  ServerProcess server;
  // stories260K: 5 layers x 2 x 4 KV heads x 8 dims x 4 bytes = 1280 bytes a token: 100 tokens fit.
  absl::Status st = server.Start(SPC_GENERATOR_BIN, {"--model", dir + "/stories260K.bin", "--tokenizer",
                                                     dir + "/tok512.bin", "--backend", "cpu", "--threads", "1",
                                                     "--log-level", "warning", "--max-kv-bytes", "128000"});
  ASSERT_TRUE(st.ok()) << st;
  auto stub = GeneratorStub(server.address());
  v1::GenerateRequest req;
  req.set_prompt("Once upon a time");
  req.set_max_new_tokens(200);
  StreamResult r = CallGenerate(stub.get(), req);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << r.status.error_message();
  EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr("--max-kv-bytes"));
  EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr("at most 100 tokens"));
  req.set_max_new_tokens(60);
  req.set_ignore_eos(true);
  r = CallGenerate(stub.get(), req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens.size(), 60u);
}

}  // namespace
}  // namespace specontext::testing
