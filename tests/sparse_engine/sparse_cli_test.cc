// Black-box tests of `specontext prune` and `specontext generate --sparse`: the happy path and every bad
// input giving a clear message and a non-zero exit.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "tests/common/cli_runner.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;

using testing::CliRun;

CliRun Cli(const std::vector<std::string>& args) { return testing::RunCli(SPECONTEXT_CLI, args); }

class SparseCliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new fs::path(fs::temp_directory_path() / absl::StrCat("spc_se_cli_", getpid()));
    fs::remove_all(*root_);
    ModelConfig c = RandomCheckpointPreset("tiny-llama-tied-gqa").value();
    RandomCheckpointOptions o;
    o.dtype = DType::kF32;
    o.seed = 9;
    o.num_threads = 2;
    ASSERT_TRUE(WriteRandomCheckpoint(c, Model(), o).ok());
    ModelConfig other = RandomCheckpointPreset("tiny-llama").value();  // other KV heads and vocabulary
    o.seed = 10;
    ASSERT_TRUE(WriteRandomCheckpoint(other, Other(), o).ok());
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
  }
  static std::string Model() { return (*root_ / "model").string(); }
  static std::string Other() { return (*root_ / "other").string(); }
  static std::string Head() { return (*root_ / "head").string(); }
  static std::string Dir(const std::string& n) { return (*root_ / n).string(); }

  static CliRun Generate(std::vector<std::string> extra) {
    std::vector<std::string> a = {"generate", "--model", Model(), "--backend", "cpu", "--max-new-tokens", "12",
                                  "--ignore-eos", "--threads", "2"};
    a.insert(a.end(), extra.begin(), extra.end());
    return Cli(a);
  }
  static fs::path* root_;
};
fs::path* SparseCliTest::root_ = nullptr;

TEST_F(SparseCliTest, PruneThenGenerateSparse) {
  CliRun p = Cli({"prune", "--source", Model(), "--kind", "layer", "--target", Model(), "--out", Head()});
  ASSERT_EQ(p.exit_code, 0) << p.err;
  EXPECT_NE(p.out.find("parameters before:"), std::string::npos) << p.out;
  EXPECT_NE(p.out.find("parameters after:"), std::string::npos) << p.out;
  EXPECT_TRUE(fs::exists(Head() + "/config.json"));

  CliRun dense = Generate({"--prompt", "hello world"});
  ASSERT_EQ(dense.exit_code, 0) << dense.err;
  // Budget above the length: the dense text; a small budget with a device limit runs the sparse path.
  CliRun sparse = Generate({"--prompt", "hello world", "--sparse", "--retrieval-head", Head(), "--budget", "64"});
  ASSERT_EQ(sparse.exit_code, 0) << sparse.err;
  EXPECT_EQ(sparse.out, dense.out);
  EXPECT_NE(sparse.err.find("[sparse] budget=64"), std::string::npos) << sparse.err;
  CliRun small = Generate({"--prompt", "hello world", "--sparse", "--retrieval-head", Head(), "--budget", "4",
                           "--sink", "2"});
  ASSERT_EQ(small.exit_code, 0) << small.err;
  EXPECT_EQ(small.err.find("sparse_steps=0"), std::string::npos) << small.err;
}

// --tensor-parallel 2 --sparse (one thread, model shard and sparse decoder per rank, the head replicated)
// writes the text of the unsharded sparse decoder with a budget that prunes, head- and batch-level, and with
// the weak-retrieval fallback (the same text and fallback counters as TP 1).
TEST_F(SparseCliTest, TensorParallelSparseWritesTheUnshardedText) {
  const std::string head = Dir("tp_head");
  CliRun p = Cli({"prune", "--source", Model(), "--kind", "layer", "--target", Model(), "--out", head});
  ASSERT_EQ(p.exit_code, 0) << p.err;
  for (const char* selection : {"head", "batch"}) {
    SCOPED_TRACE(selection);
    const std::vector<std::string> sparse = {"--prompt", "hello world, once upon a time", "--max-new-tokens", "24",
                                             "--sparse", "--retrieval-head", head, "--budget", "4", "--sink", "2",
                                             "--selection", selection};
    CliRun one = Generate(sparse);
    ASSERT_EQ(one.exit_code, 0) << one.err;
    EXPECT_EQ(one.err.find("sparse_steps=0"), std::string::npos) << one.err;
    std::vector<std::string> tp2 = sparse;
    tp2.insert(tp2.end(), {"--tensor-parallel", "2"});
    CliRun two = Generate(tp2);
    ASSERT_EQ(two.exit_code, 0) << two.err;
    EXPECT_EQ(two.out, one.out);
    EXPECT_NE(two.err.find("tensor_parallel=2"), std::string::npos) << two.err;
    EXPECT_EQ(two.err.find("sparse_steps=0"), std::string::npos) << two.err;
  }
  // The weak-retrieval fallback: the ranks add their heads' captured mass each step (one all-reduce) and take
  // the TP 1 decisions. 0.15: some steps of this text fall back, not all (the head keeps ~0.1-0.2 of its mass
  // with budget 4); 1: every sparse step does.
  auto counter = [](const std::string& err, const std::string& name) {
    const size_t at = err.find(" " + name + "=");
    return at == std::string::npos ? -1 : std::atoi(err.c_str() + at + name.size() + 2);
  };
  for (const char* mass : {"0.15", "1"}) {
    SCOPED_TRACE(absl::StrCat("--fallback-mass ", mass));
    const std::vector<std::string> sparse = {"--prompt", "hello world, once upon a time", "--max-new-tokens", "24",
                                             "--sparse", "--retrieval-head", head, "--budget", "4", "--sink", "2",
                                             "--fallback-mass", mass};
    CliRun one = Generate(sparse);
    ASSERT_EQ(one.exit_code, 0) << one.err;
    const int steps = counter(one.err, "sparse_steps"), weak = counter(one.err, "weak_retrieval_fallback_steps");
    EXPECT_GT(weak, 0) << one.err;
    if (std::string(mass) != "1") {
      EXPECT_LT(weak, steps) << one.err;
    }
    std::vector<std::string> tp2 = sparse;
    tp2.insert(tp2.end(), {"--tensor-parallel", "2"});
    CliRun two = Generate(tp2);
    ASSERT_EQ(two.exit_code, 0) << two.err;
    EXPECT_EQ(two.out, one.out);
    EXPECT_EQ(counter(two.err, "weak_retrieval_fallback_steps"), weak) << two.err;
    EXPECT_EQ(counter(two.err, "weak_retrieval_fallback_sequences"), weak) << two.err;
  }
}

// `score` with each selection source and the recall probe: one JSONL line per decode step (position, a
// recall per layer in [0, 1]), the summary in the score line; window/oracle/quest need no head.
TEST_F(SparseCliTest, ScoreWithSelectionSourcesAndRecall) {
  ASSERT_EQ(Cli({"prune", "--source", Model(), "--kind", "layer", "--target", Model(), "--out", Head()}).exit_code, 0);
  const std::string ids = Dir("ids.json");
  {
    std::ofstream f(ids);
    f << "[";
    for (int i = 0; i < 40; ++i) f << (i ? "," : "") << 3 + (i * 37) % 400;
    f << "]";
  }
  for (const char* source : {"head", "window", "oracle", "quest"}) {
    SCOPED_TRACE(source);
    const std::string out = Dir(absl::StrCat("recall_", source, ".jsonl"));
    std::vector<std::string> a = {"score", "--model", Model(), "--backend", "cpu", "--threads", "2", "--token-ids", ids,
                                  "--prompt-tokens", "10", "--sparse", "--budget", "6", "--selection-source", source,
                                  "--recall-out", out, "--buckets", "20"};
    if (std::string(source) == "head") {
      a.push_back("--retrieval-head");
      a.push_back(Head());
    }
    CliRun r = Cli(a);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find(absl::StrCat("\"selection_source\":\"", source, "\"")), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("\"recall\":{"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("\"weak_retrieval_fallback_steps\":0"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("\"weak_retrieval_fallback_sequences\":0"), std::string::npos) << r.out;
    std::ifstream f(out);
    std::string line;
    int lines = 0;
    while (std::getline(f, line)) {
      ++lines;
      EXPECT_EQ(line.rfind(absl::StrCat("{\"position\":", 9 + lines, ",\"recall\":["), 0), 0u) << line;
    }
    EXPECT_EQ(lines, 29);  // 40 tokens, 10 prefilled: 29 decode steps (the first scored token is the prefill's)
  }
  CliRun r = Cli({"score", "--model", Model(), "--backend", "cpu", "--token-ids", ids, "--recall"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--recall"), std::string::npos) << r.err;
}

TEST_F(SparseCliTest, BadInputGivesClearErrors) {
  ASSERT_EQ(Cli({"prune", "--source", Model(), "--kind", "layer", "--target", Model(), "--out", Head()}).exit_code, 0);
  struct Case {
    std::vector<std::string> args;
    std::string want;
  };
  const std::vector<Case> cases = {
      {{"--sparse", "--retrieval-head", Head(), "--budget", "0"}, "--budget"},
      {{"--sparse", "--retrieval-head", Head(), "--budget", "100000000"}, "context"},
      {{"--sparse", "--retrieval-head", Head(), "--sink", "99", "--budget", "8"}, "--sink"},
      {{"--sparse"}, "--retrieval-head"},
      {{"--budget", "16"}, "need --sparse"},
      {{"--sparse", "--retrieval-head", Dir("missing")}, "--retrieval-head"},
      {{"--sparse", "--retrieval-head", Head(), "--selection", "row"}, "--selection"},
      {{"--sparse", "--selection-source", "random"}, "--selection-source"},
      {{"--sparse", "--selection-source", "window", "--fallback-mass", "0.5"}, "--fallback-mass"},
      {{"--sparse", "--retrieval-head", Head(), "--fallback-mass", "2"}, "--fallback-mass"},
      {{"--selection-source", "window"}, "need --sparse"},
  };
  for (const Case& c : cases) {
    CliRun r = Generate(c.args);
    EXPECT_NE(r.exit_code, 0) << c.want;
    EXPECT_NE(r.err.find(c.want), std::string::npos) << "want \"" << c.want << "\" in: " << r.err;
  }
  // A head pruned for another model (other KV heads and vocabulary) does not fit this one.
  ASSERT_EQ(Cli({"prune", "--source", Other(), "--kind", "layer", "--target", Other(), "--out", Dir("other_head")})
                .exit_code,
            0);
  CliRun r = Generate({"--sparse", "--retrieval-head", Dir("other_head")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--retrieval-head"), std::string::npos) << r.err;
  // Corrupt head files.
  fs::create_directories(Dir("corrupt"));
  fs::copy_file(Head() + "/model.safetensors", Dir("corrupt") + "/model.safetensors");
  std::ofstream(Dir("corrupt") + "/config.json") << "{ not json";
  r = Generate({"--sparse", "--retrieval-head", Dir("corrupt")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("corrupt"), std::string::npos) << r.err;
  // prune's own flags.
  r = Cli({"prune", "--source", Model(), "--kind", "mlp", "--target", Model(), "--out", Dir("x")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--kind"), std::string::npos) << r.err;
  r = Cli({"prune", "--source", Model(), "--kind", "layer", "--out", Dir("x")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--target"), std::string::npos) << r.err;
  r = Cli({"prune", "--source", Dir("nope"), "--kind", "layer", "--target", Model(), "--out", Dir("x")});
  EXPECT_NE(r.exit_code, 0);
}

}  // namespace
}  // namespace specontext
