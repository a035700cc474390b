// End to end, CPU, real binaries on loopback: the sparse decode path through the generator in process
// (--retriever inproc --retrieval-head), compared with the engine CLI's `generate --sparse`, with and
// without offloaded layers; bad sparse flags; and the brief's tiny random checkpoint + pruned head setup.
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
#include "tools/random_checkpoint/random_checkpoint.h"
#include "tests/services/sparse_fixture.h"

namespace specontext::testing {
namespace {

TEST_F(SparseServices, InprocMatchesEngineCli) {
  const int kNew = 80;
  ServerProcess gen;
  std::vector<std::string> args = ModelArgs();
  for (const char* a : {"--retriever", "inproc", "--budget", "8", "--sink", "1", "--retrieval-head"}) {
    args.push_back(a);
  }
  args.push_back(head_);
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
  auto stub = GeneratorStub(gen.address());

  const std::string dense_cli = Cli({}, kNew);
  const std::string sparse_cli = Cli(SparseCliArgs(8), kNew);
  // A random head with B=8 over ~100 positions must change the text, or this test could not fail.
  ASSERT_NE(dense_cli, sparse_cli);

  StreamResult r = CallGenerate(stub.get(), Request(kNew));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", sparse_cli);
  const v1::SparsityStats& sp = r.final.sparsity();
  EXPECT_TRUE(sp.sparse());
  EXPECT_EQ(sp.budget(), 8);
  EXPECT_GT(sp.engine_sparse_steps(), 0);
  EXPECT_EQ(sp.retrieval_steps(), kNew - 1);
  EXPECT_EQ(sp.fallback_steps(), 0);
  EXPECT_GT(sp.captured_attention_mass(), 0.0);
  EXPECT_LE(sp.captured_attention_mass(), 1.0);
  EXPECT_EQ(sp.offloaded_layers(), 0);

  // Per-request switches reach the engine: dense, and another budget.
  v1::GenerateRequest dense_req = Request(kNew);
  dense_req.mutable_sparsity()->set_dense(true);
  StreamResult d = CallGenerate(stub.get(), dense_req);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.text + "\n", dense_cli);
  EXPECT_FALSE(d.final.sparsity().sparse());
  v1::GenerateRequest b16 = Request(kNew);
  b16.mutable_sparsity()->set_budget(16);
  StreamResult r16 = CallGenerate(stub.get(), b16);
  ASSERT_TRUE(r16.status.ok()) << r16.status.error_message();
  EXPECT_EQ(r16.text + "\n", Cli(SparseCliArgs(16), kNew));
  EXPECT_EQ(r16.final.sparsity().budget(), 16);

  // /metrics carries the engine's SpeContext counters.
  // B=16: the first decode step (past 16 <= B) is exact dense.
  EXPECT_GE(Metric(gen.metrics_port(), "spc_sparse_decode_steps_total"), (kNew - 1) + (kNew - 2));
  EXPECT_GT(Metric(gen.metrics_port(), "spc_dense_decode_steps_total"), 0);  // the dense request
  EXPECT_GT(Metric(gen.metrics_port(), "spc_captured_attention_mass"), 0);
  EXPECT_EQ(Metric(gen.metrics_port(), "spc_offloaded_layers"), 0);
  EXPECT_EQ(Metric(gen.metrics_port(), "spc_retrieval_fallback_steps_total"), 0);
}

// Evaluation sources and the weak-retrieval fallback through the generator: window decoding needs no head and
// gives the CLI's window text; a fallback threshold of 1 makes every sparse step fall back (every layer is
// resident, so the text is the dense one) and the count reaches /metrics.
TEST_F(SparseServices, InprocSelectionSourceAndFallback) {
  const int kNew = 40;
  {
    ServerProcess gen;
    std::vector<std::string> args = ModelArgs();
    for (const char* a : {"--retriever", "inproc", "--budget", "8", "--sink", "1", "--selection-source", "window"}) {
      args.push_back(a);
    }
    ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
    StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), Request(kNew));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.text + "\n", Cli({"--sparse", "--selection-source", "window", "--budget", "8", "--sink", "1"}, kNew));
    EXPECT_GT(Metric(gen.metrics_port(), "spc_sparse_decode_steps_total"), 0);
  }
  ServerProcess gen;
  std::vector<std::string> args = ModelArgs();
  for (const char* a : {"--retriever", "inproc", "--budget", "8", "--sink", "1", "--fallback-mass", "1",
                        "--retrieval-head"}) {
    args.push_back(a);
  }
  args.push_back(head_);
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
  StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), Request(kNew));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", Cli({}, kNew));
  const double fallback = Metric(gen.metrics_port(), "spc_weak_retrieval_fallback_steps_total");
  EXPECT_GT(fallback, 0);
  EXPECT_EQ(fallback, Metric(gen.metrics_port(), "spc_sparse_decode_steps_total"));
  // One request: one weak sequence per fallback step.
  EXPECT_EQ(Metric(gen.metrics_port(), "spc_weak_retrieval_fallback_sequences_total"), fallback);
  ExpectPromtoolAccepts(gen.metrics_port());
}

// Under a device limit the planner moves layers to host: elastic loading runs, and its counters reach the
// final response and /metrics. The limit is calibrated with the CLI (the first that offloads a layer).
TEST_F(SparseServices, InprocWithOffloadedLayersMatchesEngineCli) {
  const int kNew = 200;
  std::string cli_out;
  const std::string limit = OffloadLimit(kNew, &cli_out);
  ASSERT_FALSE(limit.empty()) << "no candidate device limit offloads a layer";
  ServerProcess gen;
  std::vector<std::string> args = ModelArgs();
  for (const char* a : {"--retriever", "inproc", "--budget", "8", "--sink", "1", "--max-batch", "1",
                        "--gpu-memory-limit"}) {
    args.push_back(a);
  }
  args.push_back(limit);
  args.push_back("--retrieval-head");
  args.push_back(head_);
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
  StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), Request(kNew));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", cli_out) << "limit " << limit;
  const v1::SparsityStats& sp = r.final.sparsity();
  EXPECT_GT(sp.offloaded_layers(), 0);
  EXPECT_GT(sp.layer_moves(), 0);
  EXPECT_GT(sp.kv_rows_loaded(), 0);
  EXPECT_GT(sp.full_reload_bytes(), sp.kv_bytes_loaded());  // elastic loading moved less than full reloads
  EXPECT_GT(sp.elastic_overlap_ratio(), 0.0);
  EXPECT_LE(sp.elastic_overlap_ratio(), 1.0);
  EXPECT_GT(Metric(gen.metrics_port(), "spc_offloaded_layers"), 0);
  EXPECT_GT(Metric(gen.metrics_port(), "spc_kv_bytes_loaded_total"), 0);
  EXPECT_GT(Metric(gen.metrics_port(), "spc_kv_bytes_avoided_total"), 0);
  EXPECT_GE(Metric(gen.metrics_port(), "spc_host_kv_bytes"), 0);  // present; 0 again once the request is freed
  ExpectPromtoolAccepts(gen.metrics_port());
}

// Bad sparse / kvstore flags stop the generator at startup with a message naming the flag.
TEST_F(SparseServices, BadSparseFlagsAreRejected) {
  const struct {
    std::vector<std::string> flags;
    std::string expect;
  } cases[] = {
      {{"--retriever", "none", "--retrieval-head", head_}, "--retrieval-head"},
      {{"--retriever", "inproc", "--retrieval-head", head_, "--budget", "100000"}, "--budget"},
      {{"--retriever", "inproc", "--retrieval-head", head_, "--budget", "4", "--sink", "9"}, "--sink"},
      {{"--retriever", "inproc", "--retrieval-head", "/nonexistent/head"}, "--retrieval-head"},
      {{"--retriever", "127.0.0.1:1", "--retriever-deadline-ms", "0"}, "--retriever-deadline-ms"},
      {{"--retriever", "127.0.0.1:1", "--retriever-max-message-bytes", "100"}, "--retriever-max-message-bytes"},
      {{"--retriever", "127.0.0.1:1", "--selection", "tokens"}, "--selection"},
      {{"--kvstore", "spc_bad_flags", "--kvstore-block-bytes", "100"}, "--kvstore-block-bytes"},
      {{"--kvstore", "bad/name"}, "--kvstore"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {"/bin/sh", "-c", "exec \"$@\" 2>&1", "sh", SPC_GENERATOR_BIN};
    for (const std::string& a : ModelArgs()) argv.push_back(a);
    for (const char* a : {"--listen", "127.0.0.1:0", "--metrics-port", "0"}) argv.push_back(a);
    argv.insert(argv.end(), c.flags.begin(), c.flags.end());
    int code = -1;
    const std::string out = RunCommand(argv, &code);
    EXPECT_EQ(code, 1) << c.expect << ": " << out;
    EXPECT_NE(out.find(c.expect), std::string::npos) << out;
  }
}

// The brief's setup: a tiny random checkpoint and a head written by `specontext prune`; greedy output of
// the generator in process and split equals the engine CLI's sparse output.
// The random-checkpoint tests: a prompt longer than the budget of 4, the engine CLI's greedy sparse text for
// it (model and head under `root`, B 4, sink 2), and the same request for the services.
constexpr char kTinyPrompt[] = "hello world, this prompt is long enough to exceed a budget of four";

std::string TinyCliText(const std::string& root, int* code) {
  return RunCommand({SPC_ENGINE_CLI_BIN, "generate", "--model", root + "/model", "--backend", "cpu", "--prompt",
                     kTinyPrompt, "--max-new-tokens", "40", "--temperature", "0", "--ignore-eos", "--sparse",
                     "--retrieval-head", root + "/head", "--budget", "4", "--sink", "2"},
                    code);
}

// f32 weights from a fresh seed.
RandomCheckpointOptions TinyOptions() {
  RandomCheckpointOptions o;
  o.dtype = DType::kF32;
  o.seed = std::random_device{}();
  o.num_threads = 2;
  return o;
}

v1::GenerateRequest TinyRequest() {
  v1::GenerateRequest req;
  req.set_prompt(kTinyPrompt);
  req.set_max_new_tokens(40);
  req.set_ignore_eos(true);
  return req;
}

TEST(SparseServicesTiny, PrunedHeadInprocAndSplitMatchEngineCli) {
  const std::string root = absl::StrCat("/tmp/spc_sparse_tiny_", getpid());
  std::filesystem::remove_all(root);
  RemoveOnExit root_guard{root};
  const ModelConfig c = RandomCheckpointPreset("tiny-llama-tied-gqa").value();
  RandomCheckpointOptions o = TinyOptions();
  ASSERT_TRUE(WriteRandomCheckpoint(c, root + "/model", o).ok());
  int code = -1;
  RunCommand({SPC_ENGINE_CLI_BIN, "prune", "--source", root + "/model", "--kind", "layer", "--target",
              root + "/model", "--out", root + "/head"}, &code);
  ASSERT_EQ(code, 0);
  const std::string cli = TinyCliText(root, &code);
  ASSERT_EQ(code, 0);
  const v1::GenerateRequest req = TinyRequest();
  const std::vector<std::string> common = {"--model", root + "/model", "--backend", "cpu", "--threads", "1",
                                           "--log-level", "warning", "--budget", "4", "--sink", "2"};
  {
    ServerProcess gen;
    std::vector<std::string> args = common;
    for (const std::string& a : {std::string("--retriever"), std::string("inproc"), std::string("--retrieval-head"),
                                 root + "/head"}) {
      args.push_back(a);
    }
    ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
    StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), req);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.text + "\n", cli);
    EXPECT_GT(r.final.sparsity().engine_sparse_steps(), 0);
  }
  {
    ServerProcess ret;
    ASSERT_TRUE(ret.Start(SPC_RETRIEVER_BIN, {"--head", root + "/head", "--model", root + "/model",
                                              "--log-level", "warning"}).ok());
    ServerProcess gen;
    std::vector<std::string> args = common;
    for (const std::string& a : {std::string("--retriever"), ret.address(), std::string("--retriever-deadline-ms"),
                                 std::string("5000")}) {
      args.push_back(a);
    }
    ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (Metric(gen.metrics_port(), "spc_retriever_connected") != 1 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(50));
    }
    StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), req);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.text + "\n", cli);
    EXPECT_EQ(r.final.sparsity().fallback_steps(), 0);
    EXPECT_GT(Metric(gen.metrics_port(), "spc_retrieval_remote_steps_total"), 0);
    // The split steps' phase timing: one per engine step (the prompt's and 39 decode steps; the metrics may lag
    // the reply by a step).
    EXPECT_GE(Metric(gen.metrics_port(), "spc_split_steps_total"), 39);
    EXPECT_GT(Metric(gen.metrics_port(), "spc_split_step_seconds_total{phase=\"select_wait\"}"), 0);
    EXPECT_GT(Metric(gen.metrics_port(), "spc_split_step_seconds_total{phase=\"forward\"}"), 0);
  }
  std::filesystem::remove_all(root);
}

// An EAGLE-3 head (`specontext prune --kind eagle3` of a random draft for the tiny checkpoint): the
// retriever needs the target's hidden states at the head's fusion layers, which the generator streams with
// every observed token in split mode; the greedy text equals the engine CLI's in-process sparse run.
TEST(SparseServicesTiny, Eagle3HeadSplitMatchesEngineCli) {
  const std::string root = absl::StrCat("/tmp/spc_sparse_eagle3_", getpid());
  std::filesystem::remove_all(root);
  RemoveOnExit root_guard{root};
  const ModelConfig c = RandomCheckpointPreset("tiny-llama-tied-gqa").value();
  RandomCheckpointOptions o = TinyOptions();
  ASSERT_TRUE(WriteRandomCheckpoint(c, root + "/model", o).ok());
  o.seed += 1;
  ASSERT_TRUE(WriteRandomEagle3Draft(c, root + "/draft", o).ok());
  int code = -1;
  const std::string pruned = RunCommand({SPC_ENGINE_CLI_BIN, "prune", "--source", root + "/draft", "--kind", "eagle3",
                                         "--target", root + "/model", "--out", root + "/head"}, &code);
  ASSERT_EQ(code, 0) << pruned;
  const std::string cli = TinyCliText(root, &code);
  ASSERT_EQ(code, 0);
  const v1::GenerateRequest req = TinyRequest();
  ServerProcess ret;
  ASSERT_TRUE(ret.Start(SPC_RETRIEVER_BIN, {"--head", root + "/head", "--model", root + "/model", "--log-level",
                                            "warning"}).ok());
  ServerProcess gen;
  std::vector<std::string> args = {"--model", root + "/model", "--backend", "cpu", "--threads", "1", "--log-level",
                                   "warning", "--budget", "4", "--sink", "2", "--retriever", ret.address(),
                                   "--retriever-deadline-ms", "5000"};
  ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, args).ok());
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (Metric(gen.metrics_port(), "spc_retriever_connected") != 1 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text + "\n", cli);
  EXPECT_EQ(r.final.sparsity().fallback_steps(), 0);
  EXPECT_GT(Metric(gen.metrics_port(), "spc_retrieval_remote_steps_total"), 0);
}

}  // namespace
}  // namespace specontext::testing
