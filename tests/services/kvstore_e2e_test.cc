// --kvstore end to end: the generator's per-request entries and host-KV block reservations in the shared
// segment, a SIGKILL mid-stream, and the restart that reattaches and reclaims every block
// (`specontext-kvstore inspect`).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
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

// --kvstore: per-request entries and host-KV block reservations live in the shared segment; a generator
// SIGKILLed mid-stream leaves them behind, and its restart (same --kvstore) reclaims every block.

TEST_F(SparseServices, KvstoreSurvivesGeneratorSigkill) {
  // Requests of the length the limit was calibrated for: longer ones would not fit it (the planner counts
  // the rows a sequence holds, and one shorter than a growth chunk holds its whole capacity).
  const int kNew = 60;
  std::string cli_out;
  const std::string limit = OffloadLimit(kNew, &cli_out);
  ASSERT_FALSE(limit.empty());
  // Removes the segment on every exit path (a failed ASSERT included); the last step checks removal.
  SegmentGuard guard("spc_svc_test_");
  const std::string& name = guard.name;
  std::vector<std::string> args = ModelArgs();
  // One running sequence at a time: the device limit was calibrated for one (the others wait in the queue,
  // with their table entries).
  for (const char* a : {"--retriever", "inproc", "--budget", "8", "--sink", "1", "--max-batch", "1",
                        "--kvstore-block-bytes", "1KiB",
                        "--kvstore-blocks", "8192", "--kvstore"}) {
    args.push_back(a);
  }
  args.push_back(name);
  for (const std::string& a : {std::string("--gpu-memory-limit"), limit, std::string("--retrieval-head"), head_}) {
    args.push_back(a);
  }
  auto gen = std::make_unique<ServerProcess>();
  ASSERT_TRUE(gen->Start(SPC_GENERATOR_BIN, args).ok());
  const pid_t first_pid = gen->pid();
  // Requests stream back to back in the background (so one is always in flight); the test kills the
  // generator under them.
  std::vector<std::thread> clients;
  std::atomic<bool> server_gone{false};
  std::atomic<int> early_errors{0};
  // Joins the clients on every exit path (an ASSERT returning early included).
  struct Joiner {
    std::vector<std::thread>* threads;
    std::atomic<bool>* stop;
    ~Joiner() {
      *stop = true;
      for (auto& t : *threads) {
        if (t.joinable()) t.join();
      }
    }
  } joiner{&clients, &server_gone};
  const std::string addr = gen->address();
  for (int c = 0; c < 3; ++c) {
    clients.emplace_back([addr, &server_gone, &early_errors] {
      auto stub = GeneratorStub(addr);
      while (!server_gone) {
        StreamResult x = CallGenerate(stub.get(), Request(kNew), 30);
        if (x.status.ok()) continue;
        if (!server_gone) ++early_errors;  // before the kill nothing may fail
        break;                             // after it: expected
      }
    });
  }
  // Freeze the generator (SIGSTOP) at a moment its segment holds blocks, so the SIGKILL lands mid-request
  // and not in the short gap between one request's release and the next one's reservation.
  nlohmann::json before;
  auto holds_blocks = [](const nlohmann::json& j) {
    return j.is_object() && j["usage"]["used_blocks"].get<int64_t>() > 0 && j["usage"]["sequences"].get<int64_t>() >= 1;
  };
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (absl::Now() < give_up) {
    if (holds_blocks(Inspect(name))) {
      gen->Signal(SIGSTOP);
      absl::SleepFor(absl::Milliseconds(20));  // let the stop take effect
      before = Inspect(name);
      if (holds_blocks(before)) break;
      gen->Signal(SIGCONT);
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_TRUE(before.is_object());
  const int64_t used_before = before["usage"]["used_blocks"].get<int64_t>();
  ASSERT_EQ(early_errors.load(), 0) << std::ifstream(gen->log_path()).rdbuf();
  ASSERT_GT(used_before, 0) << before.dump();
  bool token_count_seen = false;
  for (const auto& q : before["sequences"]) token_count_seen = token_count_seen || q["tokens"].get<int64_t>() > 0;
  EXPECT_TRUE(token_count_seen) << before.dump();
  gen->Signal(SIGKILL);
  ASSERT_TRUE(gen->WaitExit(10).ok());
  server_gone = true;
  for (auto& t : clients) t.join();
  // The dead owner's blocks are still held (nobody reclaimed them yet).
  nlohmann::json dead = Inspect(name);
  ASSERT_TRUE(dead.is_object());
  EXPECT_GT(dead["usage"]["used_blocks"].get<int64_t>(), 0);
  const int64_t orphaned = dead["usage"]["used_blocks"].get<int64_t>();

  // Restart on the same segment: reattached, every orphaned block reclaimed.
  gen = std::make_unique<ServerProcess>();
  ASSERT_TRUE(gen->Start(SPC_GENERATOR_BIN, args).ok());
  EXPECT_NE(gen->pid(), first_pid);
  nlohmann::json after = Inspect(name);
  ASSERT_TRUE(after.is_object());
  EXPECT_EQ(after["usage"]["used_blocks"].get<int64_t>(), 0) << after.dump();
  EXPECT_EQ(after["usage"]["sequences"].get<int64_t>(), 0) << after.dump();
  EXPECT_EQ(after["usage"]["free_blocks"].get<int64_t>(), after["usage"]["total_blocks"].get<int64_t>());
  EXPECT_GE(after["usage"]["reclaimed_blocks"].get<int64_t>(), orphaned);
  int alive = 0;
  for (const auto& o : after["owners"]) alive += o["alive"].get<bool>() ? 1 : 0;
  EXPECT_EQ(alive, 1) << after.dump();
  EXPECT_EQ(Metric(gen->metrics_port(), "spc_kvstore_reclaimed_blocks_total"), static_cast<double>(orphaned));
  ExpectPromtoolAccepts(gen->metrics_port());
  // It serves, and a finished request leaves nothing in the segment.
  StreamResult r = CallGenerate(GeneratorStub(gen->address()).get(), Request(60));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", cli_out);
  nlohmann::json idle = Inspect(name);
  EXPECT_EQ(idle["usage"]["used_blocks"].get<int64_t>(), 0) << idle.dump();
  EXPECT_EQ(idle["usage"]["sequences"].get<int64_t>(), 0) << idle.dump();
  gen->Signal(SIGTERM);
  EXPECT_EQ(gen->WaitExit(30).value_or(-1), 0);
  int code = -1;
  RunCommand({SPC_KVSTORE_BIN, "remove", "--name", name}, &code);
  EXPECT_EQ(code, 0);
}

}  // namespace
}  // namespace specontext::testing
