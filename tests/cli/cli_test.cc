// Black-box tests of `specontext generate`: it works on real files and turns every kind of bad
// input into a clear message and a non-zero exit, never a crash.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "tests/common/cli_runner.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;

using testing::CliRun;

CliRun Cli(const std::vector<std::string>& args) { return testing::RunCli(SPECONTEXT_CLI, args); }

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(fs::temp_directory_path() / absl::StrCat("spc_cli_", getpid()));
    fs::remove_all(*dir_);
    ModelConfig c = RandomCheckpointPreset("tiny-llama").value();
    RandomCheckpointOptions o;
    o.dtype = DType::kF32;
    o.seed = 3;
    ASSERT_TRUE(WriteRandomCheckpoint(c, Good(), o).ok());
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string Good() { return (*dir_ / "good").string(); }
  // A copy of the good checkpoint, to be broken by the test.
  static std::string Copy(const std::string& name) {
    const fs::path p = *dir_ / name;
    fs::remove_all(p);
    fs::copy(Good(), p, fs::copy_options::recursive);
    return p.string();
  }
  static void Write(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }
  static std::string Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  void ExpectError(const CliRun& r, const std::string& needle) {
    EXPECT_FALSE(r.signaled) << r.err;
    EXPECT_NE(r.exit_code, 0) << r.out;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err;
  }
  static fs::path* dir_;
};
fs::path* CliTest::dir_ = nullptr;

// Every command answers --help and -h with its usage on stdout and exit 0, and tells each default
// once.
TEST(CliHelp, EveryCommandPrintsItsUsage) {
  const std::vector<std::vector<std::string>> commands = {
      {"generate"}, {"bench"}, {"bench", "--sparse"}, {"prune"}, {"score"}, {"eval"}, {"tokenize"}};
  for (const auto& command : commands) {
    for (const std::string help : {"--help", "-h"}) {
      std::vector<std::string> words = command;
      words.push_back(help);
      const CliRun r = Cli(words);
      const std::string name = absl::StrJoin(words, " ");
      EXPECT_EQ(r.exit_code, 0) << name << ": " << r.err;
      EXPECT_TRUE(absl::StartsWith(r.out, "usage: specontext " + command[0]))
          << name << ": " << r.out;
      EXPECT_TRUE(absl::StrContains(r.out, "\nflags:\n  --")) << name << ": " << r.out;
      for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
        const size_t first = line.find("(default");
        if (first == absl::string_view::npos) continue;
        EXPECT_EQ(line.find("(default", first + 1), absl::string_view::npos)
            << name << ": " << line;
      }
    }
  }
  const CliRun generate = Cli({"generate", "--help"});
  EXPECT_TRUE(absl::StrContains(generate.out, "--max-new-tokens VALUE")) << generate.out;
  for (const std::string help : {"--help", "-h"}) {
    const CliRun top = Cli({help});
    EXPECT_EQ(top.exit_code, 0) << help;
    EXPECT_TRUE(absl::StrContains(top.out, "generate --help")) << top.out;
  }
}

TEST_F(CliTest, GeneratesFromAnHfDirectory) {
  CliRun r = Cli({"generate", "--model", Good(), "--prompt", "Hello world", "--max-new-tokens", "7", "--temperature", "0"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("generated_tokens=7"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tokens_per_s="), std::string::npos);
  CliRun again = Cli({"generate", "--model", Good(), "--prompt", "Hello world", "--max-new-tokens", "7", "--temperature", "0"});
  EXPECT_EQ(r.out, again.out);
}

// --batch-invariant (generate, eval, score, bench): accepted on the CPU backend, which has the mode; a value
// other than true/false is refused with the flag's name.
TEST_F(CliTest, BatchInvariantFlag) {
  const std::vector<std::string> base = {"generate", "--model", Good(), "--backend", "cpu", "--prompt", "Hello world",
                                         "--max-new-tokens", "7", "--temperature", "0"};
  std::vector<std::string> on = base;
  on.push_back("--batch-invariant");
  CliRun r = Cli(on);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("generated_tokens=7"), std::string::npos) << r.err;
  EXPECT_EQ(Cli(on).out, r.out);
  std::vector<std::string> bad = base;
  bad.push_back("--batch-invariant=maybe");
  ExpectError(Cli(bad), "--batch-invariant");
  for (const std::string command : {"eval", "score", "bench"}) {
    const CliRun help = Cli({command, "--help"});
    EXPECT_TRUE(absl::StrContains(help.out, "--batch-invariant")) << command << ": " << help.out;
  }
}

TEST_F(CliTest, GenerationConfigSetsSamplingDefaults) {
  const std::string d = Copy("sampling");
  Write(d + "/generation_config.json", R"({"do_sample": true, "temperature": 1.3, "top_p": 0.95, "top_k": 50})");
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"generate", "--model", d, "--prompt", "Hello", "--max-new-tokens", "24"};
    args.insert(args.end(), extra.begin(), extra.end());
    CliRun r = Cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  };
  const std::string greedy =
      Cli({"generate", "--model", Good(), "--prompt", "Hello", "--max-new-tokens", "24", "--temperature", "0"}).out;
  EXPECT_EQ(run({"--temperature", "0"}), greedy);  // the flag wins
  EXPECT_NE(run({"--seed", "1"}), run({"--seed", "2"}));  // sampling by default
  Write(d + "/generation_config.json", R"({"do_sample": true, "temperature": -2})");
  ExpectError(Cli({"generate", "--model", d, "--prompt", "x"}), "generation_config.json");
}

// --tensor-parallel N (one thread and model shard per rank, CPU backend) writes the text of one rank, greedy
// and sampled; splits the model does not allow fail with a message (sparse decoding under TP:
// tests/sparse_engine/sparse_cli_test.cc).
TEST_F(CliTest, TensorParallelWritesTheTextOfOneRank) {
  const std::vector<std::string> stories = {"generate", "--model", SPECONTEXT_MODEL_DIR "/stories260K/stories260K.bin",
                                            "--tokenizer", SPECONTEXT_MODEL_DIR "/stories260K/tok512.bin",
                                            "--backend", "cpu", "--prompt", "Once upon", "--max-new-tokens", "80"};
  auto run = [](std::vector<std::string> args, std::vector<std::string> extra) {
    args.insert(args.end(), extra.begin(), extra.end());
    CliRun r = Cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r;
  };
  const CliRun one = run(stories, {"--temperature", "0", "--tensor-parallel", "1"});
  EXPECT_GT(one.out.size(), 40u) << one.out;
  for (const char* n : {"2", "4"}) {  // stories260K: 8 heads, 4 KV heads
    const CliRun tp = run(stories, {"--temperature", "0", "--tensor-parallel", n});
    EXPECT_EQ(tp.out, one.out) << "--tensor-parallel " << n;
    EXPECT_TRUE(absl::StrContains(tp.err, absl::StrCat("tensor_parallel=", n))) << tp.err;
  }
  const std::vector<std::string> sampled = {"--temperature", "0.9", "--top-k", "40", "--seed", "11"};
  std::vector<std::string> tp2 = sampled;
  tp2.insert(tp2.end(), {"--tensor-parallel", "2"});
  EXPECT_EQ(run(stories, tp2).out, run(stories, sampled).out);

  const std::vector<std::string> tiny = {"generate", "--model", Good(), "--prompt", "Hello world",
                                         "--max-new-tokens", "20", "--temperature", "0", "--backend", "cpu"};
  EXPECT_EQ(run(tiny, {"--tensor-parallel", "2"}).out, run(tiny, {}).out);
  // The CPU ranks share host memory whatever --tensor-parallel-devices says (it places CUDA ranks).
  EXPECT_EQ(run(tiny, {"--tensor-parallel", "2", "--tensor-parallel-devices", "shared"}).out, run(tiny, {}).out);

  std::vector<std::string> bad = stories;
  bad.insert(bad.end(), {"--tensor-parallel", "3"});
  ExpectError(Cli(bad), "KV heads");
  bad = stories;
  bad.insert(bad.end(), {"--tensor-parallel", "0"});
  ExpectError(Cli(bad), "--tensor-parallel");
  bad = stories;
  bad.insert(bad.end(), {"--tensor-parallel", "2", "--tensor-parallel-devices", "both"});
  ExpectError(Cli(bad), "--tensor-parallel-devices expects separate or shared");
}

TEST_F(CliTest, StoriesFromBos) {
  CliRun r = Cli({"generate", "--model", SPECONTEXT_MODEL_DIR "/stories260K/stories260K.bin", "--tokenizer",
               SPECONTEXT_MODEL_DIR "/stories260K/tok512.bin", "--prompt", "", "--max-new-tokens", "30",
               "--temperature", "0"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("Once upon a time, there was a little girl named Lily.", 0), 0u) << r.out;
}

TEST_F(CliTest, MissingAndTruncatedFiles) {
  ExpectError(Cli({"generate", "--model", (*dir_ / "nope").string(), "--prompt", "x"}), "nope");
  const std::string trunc = Copy("truncated");
  const std::string st = Read(trunc + "/model.safetensors");
  Write(trunc + "/model.safetensors", st.substr(0, st.size() / 2));
  ExpectError(Cli({"generate", "--model", trunc, "--prompt", "x"}), "safetensors");
  const std::string bin = (*dir_ / "stories.bin").string();
  Write(bin, Read(SPECONTEXT_MODEL_DIR "/stories260K/stories260K.bin").substr(0, 5000));
  ExpectError(Cli({"generate", "--model", bin, "--tokenizer", SPECONTEXT_MODEL_DIR "/stories260K/tok512.bin",
                   "--prompt", ""}),
              "stories.bin");
}

TEST_F(CliTest, LyingSafetensorsHeader) {
  const std::string d = Copy("lying");
  std::string st = Read(d + "/model.safetensors");
  // Point the first data_offsets far past the end of the file, keeping the header length.
  const size_t pos = st.find("\"data_offsets\":[");
  ASSERT_NE(pos, std::string::npos);
  const size_t close = st.find(']', pos);
  std::string repl = "\"data_offsets\":[0,999999999";
  repl.resize(close - pos, ' ');
  repl.back() = '9';
  st.replace(pos, close - pos, repl);
  Write(d + "/model.safetensors", st);
  ExpectError(Cli({"generate", "--model", d, "--prompt", "x"}), "safetensors");
}

TEST_F(CliTest, BadConfigs) {
  std::string d = Copy("badjson");
  Write(d + "/config.json", "{\"hidden_size\": 64,");
  ExpectError(Cli({"generate", "--model", d, "--prompt", "x"}), "config.json");
  d = Copy("badarch");
  std::string cfg = Read(d + "/config.json");
  cfg.replace(cfg.find("LlamaForCausalLM"), 16, "MambaForCausalLM");
  const size_t mt = cfg.find("\"llama\"");
  if (mt != std::string::npos) cfg.replace(mt, 7, "\"mamba\"");
  Write(d + "/config.json", cfg);
  ExpectError(Cli({"generate", "--model", d, "--prompt", "x"}), "architecture");
  d = Copy("badshape");
  cfg = Read(d + "/config.json");
  const size_t is = cfg.find("\"intermediate_size\"");
  ASSERT_NE(is, std::string::npos);
  const size_t colon = cfg.find(':', is), end = cfg.find_first_of(",}", colon);
  cfg.replace(colon + 1, end - colon - 1, " 96");
  Write(d + "/config.json", cfg);
  ExpectError(Cli({"generate", "--model", d, "--prompt", "x"}), "shape");
}

TEST_F(CliTest, BadFlagsAndPrompts) {
  ExpectError(Cli({"generate", "--model", Good(), "--temperature", "nan"}), "temperature");
  ExpectError(Cli({"generate", "--model", Good(), "--temperature", "-1"}), "temperature");
  ExpectError(Cli({"generate", "--model", Good(), "--top-p", "1.5"}), "top_p");
  ExpectError(Cli({"generate", "--model", Good(), "--max-new-tokens", "0"}), "max-new-tokens");
  ExpectError(Cli({"generate", "--model", Good(), "--bogus", "1"}), "--bogus");
  ExpectError(Cli({"generate", "--prompt", "x"}), "--model");
  ExpectError(Cli({"generate", "--model", Good(), "--backend", "tpu"}), "tpu");
  std::string long_prompt;
  for (int i = 0; i < 3000; ++i) long_prompt += "word ";
  ExpectError(Cli({"generate", "--model", Good(), "--prompt", long_prompt}), "context");
  // A llama2.c checkpoint alone (no tok512.bin beside it) cannot tokenize a prompt.
  const std::string lone = (*dir_ / "lone").string();
  std::filesystem::create_directories(lone);
  fs::copy_file(SPECONTEXT_MODEL_DIR "/stories260K/stories260K.bin", lone + "/stories260K.bin",
                fs::copy_options::overwrite_existing);
  ExpectError(Cli({"generate", "--model", lone + "/stories260K.bin", "--prompt", "hi"}), "tokenizer");
  ExpectError(Cli({"frobnicate"}), "unknown command");
}

// `specontext score`: teacher-forced perplexity of a text through the decode path, and its logits as .npy.
TEST_F(CliTest, ScoresATextAndWritesItsLogits) {
  const std::string text = (*dir_ / "story.txt").string();
  Write(text, "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.");
  const std::string npy = (*dir_ / "logits.npy").string();
  const std::string model = SPECONTEXT_MODEL_DIR "/stories260K/stories260K.bin";
  const std::string tok = SPECONTEXT_MODEL_DIR "/stories260K/tok512.bin";
  CliRun r = Cli({"score", "--model", model, "--tokenizer", tok, "--text", text, "--buckets", "8",
                  "--prompt-tokens", "2", "--logits-out", npy});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  const int64_t n = j["tokens"].get<int64_t>();
  EXPECT_GT(n, 10);
  EXPECT_EQ(j["scored"].get<int64_t>(), n - 2);
  // A trained model predicts a children's story far better than chance (512 tokens).
  EXPECT_LT(j["perplexity"].get<double>(), 40.0);
  EXPECT_GT(j["perplexity"].get<double>(), 1.0);
  ASSERT_EQ(j["buckets"].size(), 2u);
  EXPECT_EQ(j["buckets"][0]["tokens"].get<int64_t>() + j["buckets"][1]["tokens"].get<int64_t>(), n - 2);
  // .npy: 128-byte header for this shape, then [n - 2, 512] f32.
  const std::string data = Read(npy);
  EXPECT_EQ(data.substr(1, 5), "NUMPY");
  EXPECT_NE(data.find(absl::StrCat("'shape': (", n - 2, ", 512)")), std::string::npos);
  EXPECT_EQ(data.size() % 64, 0u);
  EXPECT_EQ(data.size(), 128 + static_cast<size_t>(n - 2) * 512 * 4);

  const std::string ids = (*dir_ / "ids.json").string();
  Write(ids, "[1, 403, 407, 261, 378]");
  CliRun again = Cli({"score", "--model", model, "--tokenizer", tok, "--token-ids", ids});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(nlohmann::json::parse(again.out)["scored"].get<int64_t>(), 4);

  ExpectError(Cli({"score", "--model", model, "--tokenizer", tok}), "exactly one of --token-ids");
  ExpectError(Cli({"score", "--model", model, "--tokenizer", tok, "--token-ids", ids, "--prompt-tokens", "5"}),
              "--prompt-tokens");
  Write(ids, "[1, -4]");
  ExpectError(Cli({"score", "--model", model, "--tokenizer", tok, "--token-ids", ids}), "non-negative");
  Write(ids, "[1, 100000]");
  ExpectError(Cli({"score", "--model", model, "--tokenizer", tok, "--token-ids", ids}), "outside the vocabulary");
  Write(ids, "{\"tokens\": 3}");
  ExpectError(Cli({"score", "--model", model, "--tokenizer", tok, "--token-ids", ids}), "JSON array");
  ExpectError(Cli({"score", "--model", model, "--tokenizer", tok, "--token-ids", ids, "--budget", "8"}),
              "need --sparse");
}

}  // namespace
}  // namespace specontext
