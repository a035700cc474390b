// Black-box tests of `specontext bench --sparse` and of the EAGLE-3 drafts of specontext-random-checkpoint:
// the draft prunes into a head, the benchmark's JSON lines carry sane figures (grid, trajectory with layers
// offloaded under a device limit, synthetic overlap, dense in the same harness), memory that does not fit
// gives a JSON error line, and bad flags exit non-zero with a message naming the flag.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tests/common/cli_runner.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::CliRun;

CliRun Cli(const std::vector<std::string>& args) { return testing::RunCli(SPECONTEXT_CLI, args); }

std::vector<json> Lines(const std::string& out) {
  std::vector<json> v;
  size_t pos = 0;
  while (pos < out.size()) {
    size_t end = out.find('\n', pos);
    if (end == std::string::npos) end = out.size();
    const std::string line = out.substr(pos, end - pos);
    if (!line.empty()) v.push_back(json::parse(line));  // every stdout line must be JSON
    pos = end + 1;
  }
  return v;
}

std::vector<json> OfKind(const std::vector<json>& lines, const std::string& kind) {
  std::vector<json> v;
  for (const json& j : lines) {
    if (j.value("kind", "") == kind) v.push_back(j);
  }
  return v;
}

class BenchSparseCliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new fs::path(fs::temp_directory_path() / absl::StrCat("spc_bench_sparse_", getpid()));
    fs::remove_all(*root_);
    ModelConfig c = RandomCheckpointPreset("tiny-llama-tied-gqa").value();
    RandomCheckpointOptions o;
    o.dtype = DType::kF32;
    o.seed = static_cast<uint64_t>(getpid());  // fresh weights each run
    o.num_threads = 2;
    ASSERT_TRUE(WriteRandomCheckpoint(c, Dir("model"), o).ok());
    CliRun d = testing::RunCli(SPECONTEXT_RANDOM_CHECKPOINT,
                               {"--eagle3_for", "tiny-llama-tied-gqa", "--out", Dir("draft"), "--seed",
                                std::to_string(getpid() + 1)});
    ASSERT_EQ(d.exit_code, 0) << d.err;
    CliRun p = Cli({"prune", "--source", Dir("draft"), "--kind", "eagle3", "--target", Dir("model"), "--out",
                    Dir("head")});
    ASSERT_EQ(p.exit_code, 0) << p.err;
    *prune_out_ = p.out;
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
  }
  static std::string Dir(const std::string& n) { return (*root_ / n).string(); }
  static CliRun Bench(std::vector<std::string> extra, const std::string& backend = "cpu") {
    std::vector<std::string> a = {"bench",  "--sparse",  "--model",         Dir("model"), "--retrieval-head",
                                  Dir("head"), "--backend", backend, "--threads", "2", "--budget", "16",
                                  "--steps", "3", "--warmup", "1", "--prefill-chunk", "32"};
    a.insert(a.end(), extra.begin(), extra.end());
    return Cli(a);
  }
  // The planner's fixed bytes for this model (weights, workspace bound, other live bytes), from the setup line
  // of a run under a roomy limit.
  // The planner's fixed bytes with `requests` sequences per step (its step bound grows with them).
  static int64_t PlannerFixedBytes(const std::string& backend = "cpu", const std::string& requests = "1") {
    CliRun r = Bench({"--gpu-memory-limit", backend == "cpu" ? "64MiB" : "2GiB", "--context", "40", "--requests",
                      requests}, backend);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    const std::vector<json> setup = OfKind(Lines(r.out), "setup");
    if (setup.size() != 1) {
      ADD_FAILURE() << r.out;
      return 0;
    }
    return static_cast<int64_t>(setup[0].value("planner_fixed_bytes", 0.0));
  }
  static fs::path* root_;
  static std::string* prune_out_;
};
fs::path* BenchSparseCliTest::root_ = nullptr;
std::string* BenchSparseCliTest::prune_out_ = new std::string;

TEST_F(BenchSparseCliTest, PruneAcceptsTheToolsEagle3Draft) {
  const ModelConfig c = RandomCheckpointPreset("tiny-llama-tied-gqa").value();
  const Eagle3DraftShape s = Eagle3DraftShapeFor(c);
  int64_t before = 0, after = 0;
  const std::vector<std::string> kept = {"fc.weight", "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
                                         "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight"};
  for (const TensorSpec& t : Eagle3DraftTensors(s, DType::kBF16)) {
    if (IsFloating(t.dtype)) before += NumElements(t.shape);  // d2t/t2d are buffers, not parameters
    if (std::find(kept.begin(), kept.end(), t.name) != kept.end()) after += NumElements(t.shape);
  }
  EXPECT_LT(after * 2, before);  // v/o/MLP/LM head dropped
  EXPECT_NE(prune_out_->find(absl::StrCat("parameters before: ", before)), std::string::npos) << *prune_out_;
  EXPECT_NE(prune_out_->find(absl::StrCat("parameters after:  ", after)), std::string::npos) << *prune_out_;
  const json cfg = json::parse(std::ifstream(Dir("draft") + "/config.json"));
  EXPECT_EQ(cfg["architectures"][0], "LlamaForCausalLMEagle3");
  EXPECT_EQ(cfg["num_hidden_layers"], 1);
  EXPECT_EQ(cfg["draft_vocab_size"], s.draft_vocab);
  // SpecForge's layout: trained at 2K without scaling (prune stretches it only when asked: --yarn-factor).
  EXPECT_EQ(cfg["max_position_embeddings"], 2048);
  EXPECT_TRUE(cfg["rope_scaling"].is_null());
  EXPECT_TRUE(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"].is_array());
  // A draft for another target does not fit this model.
  CliRun other = testing::RunCli(SPECONTEXT_RANDOM_CHECKPOINT, {"--eagle3_for", "tiny-llama", "--out", Dir("draft2")});
  ASSERT_EQ(other.exit_code, 0) << other.err;
  CliRun bad = Cli({"prune", "--source", Dir("draft2"), "--kind", "eagle3", "--target", Dir("model"), "--out",
                    Dir("head2")});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("does not fit"), std::string::npos) << bad.err;
}

TEST_F(BenchSparseCliTest, GridLinesHaveSaneFigures) {
  CliRun r = Bench({"--requests", "1,2", "--context", "40,90"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> lines = Lines(r.out);
  const std::vector<json> setup = OfKind(lines, "setup");
  ASSERT_EQ(setup.size(), 1u);
  EXPECT_EQ(setup[0]["head_kind"], "eagle3");
  EXPECT_EQ(setup[0]["host_kv_layout"], "plain");  // the CPU backend's kernels take plain host tiers only
  EXPECT_EQ(setup[0]["host_kv_layer_group"], 1);
  EXPECT_EQ(setup[0]["cuda_graphs"], true);
  const std::vector<json> pts = OfKind(lines, "decode");
  ASSERT_EQ(pts.size(), 4u) << r.out;
  for (const json& j : pts) {
    SCOPED_TRACE(j.dump());
    ASSERT_FALSE(j.contains("error"));
    for (const char* k : {"step_ms", "tokens_per_s", "gpu_layers", "offloaded_layers", "overlap", "set_overlap",
                          "rows_loaded_per_step", "bytes_loaded_per_step", "bytes_full_reload_per_step",
                          "captured_mass", "device_bytes", "host_pinned_bytes", "copy_exposed_ms_per_step",
                          "copy_hidden_ms_per_step", "hbm_bytes", "pcie_bytes", "floor_ms", "ratio_to_floor"}) {
      EXPECT_TRUE(j.contains(k)) << k;
    }
    EXPECT_GT(j["step_ms"].get<double>(), 0);
    EXPECT_NEAR(j["tokens_per_s"].get<double>(), j["requests"].get<double>() * 1e3 / j["step_ms"].get<double>(),
                1e-6 * j["tokens_per_s"].get<double>());
    EXPECT_EQ(j["sparse_steps"], 3);  // every past (>= 40) exceeds the budget 16
    EXPECT_GE(j["set_overlap"].get<double>(), 0.0);
    EXPECT_LE(j["set_overlap"].get<double>(), 1.0);
    EXPECT_GT(j["captured_mass"].get<double>(), 0.0);
    EXPECT_LE(j["captured_mass"].get<double>(), 1.0 + 1e-6);
    EXPECT_GE(j["hbm_bytes"].get<double>(), setup[0]["weight_bytes"].get<double>());
    EXPECT_GT(j["floor_ms"].get<double>(), 0);
    EXPECT_EQ(j["offloaded_layers"], 0);  // no device limit on the CPU: planner off
  }
}

TEST_F(BenchSparseCliTest, TrajectoryOffloadsUnderALimitAndIntegratesStepTimes) {
  const int64_t fixed = PlannerFixedBytes("cpu", "2");
  ASSERT_GT(fixed, 0);
  // Planner limit = limit - limit/8 (the margin): room for some layers' KV only.
  const int64_t limit = (fixed + 40000) * 8 / 7;
  CliRun r = Bench({"--requests", "2", "--trajectory", "32:96", "--measure-every", "32", "--synthetic-overlap", "0.75",
                    "--gpu-memory-limit", std::to_string(limit), "--kv-grow-rows", "16"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> lines = Lines(r.out);
  const std::vector<json> pts = OfKind(lines, "trajectory_point");
  ASSERT_EQ(pts.size(), 4u) << r.out;  // 32, 64, 96, 128
  for (const json& j : pts) {
    SCOPED_TRACE(j.dump());
    EXPECT_GT(j["offloaded_layers"].get<int>(), 0);
    EXPECT_GT(j["host_pinned_bytes"].get<int64_t>(), 0);
    // The elastic counters and the sets agree; synthetic overlap 0.75 of 16 positions keeps 12.
    EXPECT_NEAR(j["overlap"].get<double>(), j["set_overlap"].get<double>(), 1e-9);
    EXPECT_NEAR(j["overlap"].get<double>(), 0.75, 0.02);
    EXPECT_GT(j["bytes_loaded_per_step"].get<double>(), 0);
    EXPECT_NEAR(j["loaded_vs_full_reload"].get<double>(), 1 - j["overlap"].get<double>(), 0.02);
    EXPECT_GT(j["pcie_bytes"].get<double>(), j["bytes_loaded_per_step"].get<double>() - 1);
  }
  ASSERT_EQ(OfKind(lines, "allocated").size(), 1u);
  ASSERT_EQ(OfKind(lines, "filled").size(), 1u);
  EXPECT_EQ(OfKind(lines, "filled")[0]["context"], 32);
  const std::vector<json> sum = OfKind(lines, "trajectory");
  ASSERT_EQ(sum.size(), 1u);
  ASSERT_FALSE(sum[0].contains("error")) << sum[0].dump();
  double total_ms = 0;
  for (size_t k = 0; k + 1 < pts.size(); ++k) {
    total_ms += 0.5 * (pts[k]["step_ms"].get<double>() + pts[k + 1]["step_ms"].get<double>()) *
                (pts[k + 1]["context"].get<double>() - pts[k]["context"].get<double>());
  }
  // The tier changes of the run (growths, layer moves) are part of the generation time.
  total_ms += 1e3 * (sum[0]["kv_grow_seconds"].get<double>() + sum[0]["layer_move_seconds"].get<double>());
  EXPECT_GT(sum[0]["kv_grows"].get<int64_t>(), 0);
  EXPECT_NEAR(sum[0]["generate_seconds"].get<double>(), total_ms / 1e3, 1e-9 * total_ms);
  EXPECT_NEAR(sum[0]["tokens_per_s"].get<double>(), 2.0 * 96 / (total_ms / 1e3),
              1e-6 * sum[0]["tokens_per_s"].get<double>());
  EXPECT_NE(sum[0]["method"].get<std::string>().find("trapezoid"), std::string::npos);

  // Too little memory even with every layer offloaded: a JSON error line, exit 0.
  CliRun tight = Bench({"--requests", "2", "--trajectory", "32:96", "--measure-every", "32", "--gpu-memory-limit",
                        std::to_string((fixed + 100) * 8 / 7)});
  ASSERT_EQ(tight.exit_code, 0) << tight.err;
  const std::vector<json> t = OfKind(Lines(tight.out), "trajectory");
  ASSERT_EQ(t.size(), 1u) << tight.out;
  EXPECT_NE(t[0].value("error", "").find("even with every layer offloaded"), std::string::npos) << t[0].dump();
}

// CUDA only (skipped without a GPU build or device): the copy stream's load times are measured, and
// exposed + hidden add up to the load time.
TEST_F(BenchSparseCliTest, CudaCopyTimeHiddenVsExposed) {
  CliRun probe = Bench({"--requests", "1", "--context", "40"}, "cuda");
  if (probe.exit_code != 0) GTEST_SKIP() << "no CUDA backend here: " << probe.err;
  // The run's planner reserves prefill staging for its own capacity (SparseOptions::max_context): probe the
  // fixed bytes of a run of that capacity (its "allocated" line).
  const std::vector<std::string> run = {"--requests", "2", "--trajectory", "64:128", "--measure-every", "64",
                                        "--synthetic-overlap", "0.5", "--steps", "6"};
  std::vector<std::string> probe_args = run;
  probe_args.insert(probe_args.end(), {"--gpu-memory-limit", "2GiB"});
  CliRun probe_run = Bench(probe_args, "cuda");
  ASSERT_EQ(probe_run.exit_code, 0) << probe_run.err;
  const std::vector<json> allocated = OfKind(Lines(probe_run.out), "allocated");
  ASSERT_FALSE(allocated.empty()) << probe_run.out;
  const int64_t fixed = static_cast<int64_t>(allocated[0].value("planner_fixed_bytes", 0.0));
  ASSERT_GT(fixed, 0);
  const int64_t limit = (fixed + 40000) * 8 / 7;
  std::vector<std::string> args = run;
  args.insert(args.end(), {"--gpu-memory-limit", std::to_string(limit)});
  CliRun r = Bench(args, "cuda");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> pts = OfKind(Lines(r.out), "trajectory_point");
  ASSERT_EQ(pts.size(), 3u) << r.out;
  for (const json& j : pts) {
    SCOPED_TRACE(j.dump());
    ASSERT_GT(j["offloaded_layers"].get<int>(), 0);
    // One timed load per offloaded layer and step (read back one step later).
    EXPECT_GE(j["copy_timed_loads"].get<int64_t>(), (6 - 1) * j["offloaded_layers"].get<int64_t>());
    EXPECT_GT(j["copy_ms_per_step"].get<double>(), 0);
    EXPECT_GE(j["copy_exposed_ms_per_step"].get<double>(), 0);
    EXPECT_GE(j["copy_hidden_ms_per_step"].get<double>(), 0);
    EXPECT_LT(j["copy_ms_per_step"].get<double>(), j["step_ms"].get<double>() * 2);
  }
}

TEST_F(BenchSparseCliTest, DenseInTheSameHarness) {
  CliRun r = Cli({"bench", "--sparse", "--dense", "--model", Dir("model"), "--backend", "cpu", "--threads", "2",
                  "--requests", "2", "--context", "64", "--steps", "3", "--prefill-chunk", "32"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> pts = OfKind(Lines(r.out), "decode");
  ASSERT_EQ(pts.size(), 1u);
  EXPECT_EQ(pts[0]["attention"], "dense");
  EXPECT_GT(pts[0]["step_ms"].get<double>(), 0);
  EXPECT_FALSE(pts[0].contains("overlap"));
}

TEST_F(BenchSparseCliTest, BadFlagsExitNonZeroNamingTheFlag) {
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  };
  for (const Case& c : std::vector<Case>{{{"--trajectory", "5"}, "--trajectory"},
                                         {{"--trajectory", "32:0"}, "--trajectory"},
                                         {{"--requests", "0"}, "--requests"},
                                         {{"--context", "x"}, "--context"},
                                         {{"--synthetic-overlap", "1.5"}, "--synthetic-overlap"},
                                         {{"--budget", "0"}, "--budget"},
                                         {{"--steps", "0"}, "--steps"},
                                         {{"--trajectory", "32:64", "--requests", "1,2"}, "--requests"},
                                         {{"--trajectory", "32:64", "--measure-every", "2"}, "--measure-every"},
                                         {{"--retrieval-head", "/nonexistent/head"}, "--retrieval-head"},
                                         {{"--hbm-gbs", "-1"}, "--hbm-gbs"},
                                         {{"--kv-grow-rows", "-1"}, "--kv-grow-rows"},
                                         {{"--cuda-graphs", "both"}, "--cuda-graphs"},
                                         {{"--host-kv-layer-group", "0"}, "--host-kv-layer-group"},
                                         {{"--host-kv-layer-group", "999"}, "--host-kv-layer-group"},
                                         {{"--bogus", "1"}, "--bogus"}}) {
    CliRun r = Bench(c.args);
    SCOPED_TRACE(c.args[0] + " " + c.args[1]);
    EXPECT_NE(r.exit_code, 0) << r.out;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << r.err;
  }
  CliRun nohead = Cli({"bench", "--sparse", "--model", Dir("model"), "--backend", "cpu"});
  EXPECT_NE(nohead.exit_code, 0);
  EXPECT_NE(nohead.err.find("--retrieval-head"), std::string::npos) << nohead.err;
}

}  // namespace
}  // namespace specontext
