// Split mode end to end (--retriever HOST:PORT): same greedy output as the engine CLI's sparse run; the
// retriever SIGKILLed mid-stream (requests complete on the fallback) and restarted (the generator
// reconnects and sparse steps resume); a retriever that answers late (SIGSTOP) costs one deadline per step.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/services/sparse_fixture.h"

namespace specontext::testing {
namespace {

TEST_F(SparseServices, SplitMatchesInprocAndSurvivesRetrieverRestart) {
  const int kNew = 80;
  ServerProcess ret;
  ASSERT_TRUE(ret.Start(SPC_RETRIEVER_BIN, {"--head", head_, "--log-level", "warning"}).ok());
  const std::string ret_addr = ret.address();
  ServerProcess gen;
  std::vector<std::string> args = ModelArgs();
  for (const char* a : {"--budget", "8", "--sink", "1", "--retriever-deadline-ms", "2000", "--retriever"}) {
    args.push_back(a);
  }
  args.push_back(ret_addr);
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
  auto stub = GeneratorStub(gen.address());
  const std::string sparse_cli = Cli(SparseCliArgs(8), kNew);
  const std::string dense_cli = Cli({}, kNew);

  // The session opens in the background: wait for it before comparing outputs.
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (Metric(gen.metrics_port(), "spc_retriever_connected") != 1 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_EQ(Metric(gen.metrics_port(), "spc_retriever_connected"), 1);
  StreamResult r = CallGenerate(stub.get(), Request(kNew));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", sparse_cli);
  EXPECT_TRUE(r.final.sparsity().sparse());
  EXPECT_EQ(r.final.sparsity().fallback_steps(), 0);
  EXPECT_EQ(r.final.sparsity().retrieval_steps(), kNew - 1);
  EXPECT_GE(Metric(gen.metrics_port(), "spc_retrieval_remote_steps_total"), kNew - 8);
  EXPECT_EQ(Metric(gen.metrics_port(), "spc_retrieval_fallback_steps_total"), 0);
  // One ObserveBatch per step (the prompt's, then each decode token's), no single Observes.
  EXPECT_GE(Metric(ret.metrics_port(), "spc_retriever_messages_total{kind=\"observe_batch\"}"), kNew - 1);
  EXPECT_LE(Metric(ret.metrics_port(), "spc_retriever_messages_total{kind=\"observe_batch\"}"), kNew + 1);
  EXPECT_LE(Metric(ret.metrics_port(), "spc_retriever_messages_total{kind=\"observe\"}"), 0);

  // Fault: clients stream continuously while the retriever is SIGKILLed and later restarted on its port.
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&] {
      auto s = GeneratorStub(gen.address());
      while (!stop) {
        StreamResult x = CallGenerate(s.get(), Request(300));
        (x.status.ok() && x.final.done() ? ok : failed)++;
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(800));
  ret.Signal(SIGKILL);
  ASSERT_TRUE(ret.WaitExit(10).ok());
  absl::SleepFor(absl::Milliseconds(1500));
  const double fallback = Metric(gen.metrics_port(), "spc_retrieval_fallback_steps_total");
  EXPECT_GT(fallback, 0);
  EXPECT_EQ(Metric(gen.metrics_port(), "spc_retriever_connected"), 0);
  ServerProcess ret2;
  ASSERT_TRUE(ret2.Start(SPC_RETRIEVER_BIN, {"--head", head_, "--log-level", "warning"}, 60, ret_addr).ok());
  const absl::Time back_by = absl::Now() + absl::Seconds(20);
  while (Metric(gen.metrics_port(), "spc_retriever_reconnects_total") < 1 && absl::Now() < back_by) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_GE(Metric(gen.metrics_port(), "spc_retriever_reconnects_total"), 1);
  const double remote_before = Metric(gen.metrics_port(), "spc_retrieval_remote_steps_total");
  absl::SleepFor(absl::Milliseconds(1000));
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(ok.load(), 4);
  // The sparse path resumed on the new session (sequences re-opened and replayed).
  EXPECT_GT(Metric(gen.metrics_port(), "spc_retrieval_remote_steps_total"), remote_before);
  const double fallback_after = Metric(gen.metrics_port(), "spc_retrieval_fallback_steps_total");
  StreamResult again = CallGenerate(stub.get(), Request(kNew));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.text + "\n", sparse_cli);
  EXPECT_EQ(Metric(gen.metrics_port(), "spc_retrieval_fallback_steps_total"), fallback_after);
  EXPECT_NE(again.text + "\n", dense_cli);
  ExpectPromtoolAccepts(gen.metrics_port());
}

// A retriever that stops answering (SIGSTOP: the stream stays open) makes steps late: each waits the
// deadline, falls back and the request completes; once it answers again (SIGCONT) the late replies are
// discarded by step number and index sets are used again.
TEST_F(SparseServices, LateRetrieverFallsBackPerStep) {
  ServerProcess ret;
  ASSERT_TRUE(ret.Start(SPC_RETRIEVER_BIN, {"--head", head_, "--log-level", "warning"}).ok());
  ServerProcess gen;
  std::vector<std::string> args = ModelArgs();
  for (const char* a : {"--budget", "8", "--sink", "1", "--retriever-deadline-ms", "40", "--retriever"}) {
    args.push_back(a);
  }
  args.push_back(ret.address());
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
  auto stub = GeneratorStub(gen.address());
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (Metric(gen.metrics_port(), "spc_retriever_connected") != 1 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_EQ(Metric(gen.metrics_port(), "spc_retriever_connected"), 1);
  ret.Signal(SIGSTOP);
  const absl::Time t0 = absl::Now();
  StreamResult late = CallGenerate(stub.get(), Request(30));
  const absl::Duration took = absl::Now() - t0;
  ASSERT_TRUE(late.status.ok()) << late.status.error_message();
  EXPECT_EQ(late.final.usage().generated_tokens(), 30);
  // Decode steps past the budget (about 29 - 8 of them) each waited the 40 ms deadline.
  EXPECT_GE(late.final.sparsity().fallback_steps(), 15);
  EXPECT_GE(took, absl::Milliseconds(15 * 40));
  EXPECT_EQ(Metric(gen.metrics_port(), "spc_retriever_connected"), 1);  // late, not down
  ret.Signal(SIGCONT);
  // Drain: the first requests after SIGCONT may still meet the backlog; then steps are on time again.
  const std::string sparse_cli = Cli(SparseCliArgs(8), 80);
  StreamResult again;
  for (int i = 0; i < 20; ++i) {
    again = CallGenerate(stub.get(), Request(80));
    ASSERT_TRUE(again.status.ok()) << again.status.error_message();
    if (again.final.sparsity().fallback_steps() == 0) break;
  }
  EXPECT_EQ(again.final.sparsity().fallback_steps(), 0);
  EXPECT_EQ(again.text + "\n", sparse_cli);
}

// Split mode under a device limit: layers move to host and elastic loads run with the retriever's sets
// (same output as the CLI's inproc run); with the retriever gone, steps fall back to the sink + recent
// window the slot buffers hold, and requests still complete.
TEST_F(SparseServices, SplitWithOffloadedLayersMatchesCliAndFallsBackToWindow) {
  const int kNew = 200;
  std::string cli_out;
  const std::string limit = OffloadLimit(kNew, &cli_out);
  ASSERT_FALSE(limit.empty());
  ServerProcess ret;
  ASSERT_TRUE(ret.Start(SPC_RETRIEVER_BIN, {"--head", head_, "--log-level", "warning"}).ok());
  ServerProcess gen;
  std::vector<std::string> args = ModelArgs();
  for (const std::string& a : {std::string("--budget"), std::string("8"), std::string("--sink"), std::string("1"),
                               std::string("--max-batch"), std::string("1"), std::string("--gpu-memory-limit"), limit,
                               std::string("--retriever-deadline-ms"), std::string("2000"),
                               std::string("--retriever"), ret.address()}) {
    args.push_back(a);
  }
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
  auto stub = GeneratorStub(gen.address());
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (Metric(gen.metrics_port(), "spc_retriever_connected") != 1 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  StreamResult r = CallGenerate(stub.get(), Request(kNew));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", cli_out) << "limit " << limit;
  EXPECT_GT(r.final.sparsity().offloaded_layers(), 0);
  EXPECT_GT(r.final.sparsity().kv_rows_loaded(), 0);
  EXPECT_EQ(r.final.sparsity().fallback_steps(), 0);
  ret.Signal(SIGKILL);
  ASSERT_TRUE(ret.WaitExit(10).ok());
  StreamResult f = CallGenerate(stub.get(), Request(kNew));
  ASSERT_TRUE(f.status.ok()) << f.status.error_message();
  EXPECT_EQ(f.final.usage().generated_tokens(), kNew);
  EXPECT_GT(f.final.sparsity().fallback_steps(), kNew / 2);
  EXPECT_GT(Metric(gen.metrics_port(), "spc_retrieval_fallback_steps_total"), kNew / 2);
  EXPECT_NE(f.text + "\n", cli_out);  // a recent window is not the retrieval head's selection
}

}  // namespace
}  // namespace specontext::testing
