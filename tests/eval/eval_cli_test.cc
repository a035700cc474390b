// Black-box tests of `specontext eval`: known scores on stories260K, sparse budgets above every sequence
// giving exactly the dense results on a tiny checkpoint with a `layer` head, fidelity of dense against itself
// never diverging, and bad task files and flags turned into a message naming the problem and a non-zero
// exit, never a crash.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tests/common/cli_runner.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::CliRun;

CliRun Cli(const std::vector<std::string>& args) { return testing::RunCli(SPECONTEXT_CLI, args); }

const std::string kStories = SPECONTEXT_MODEL_DIR "/stories260K/stories260K.bin";
const std::string kStoriesTok = SPECONTEXT_MODEL_DIR "/stories260K/tok512.bin";
const std::string kTinyTasks = SPECONTEXT_TEST_DATA "/eval/tiny_tasks.jsonl";

std::vector<json> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<json> out;
  for (std::string line; std::getline(in, line);) out.push_back(json::parse(line));
  return out;
}

std::vector<json> OfType(const std::vector<json>& lines, const std::string& type) {
  std::vector<json> out;
  for (const json& j : lines) {
    if (j["type"] == type) out.push_back(j);
  }
  return out;
}

// (id, setting, budget: 0 for dense) -> the result line.
using ResultMap = std::map<std::tuple<std::string, std::string, int>, json>;
ResultMap Results(const std::vector<json>& lines, const std::string& type) {
  ResultMap out;
  for (const json& j : OfType(lines, type)) {
    out[{j["id"], j["setting"], j["budget"].is_null() ? 0 : j["budget"].get<int>()}] = j;
  }
  return out;
}

json At(const ResultMap& m, const std::string& id, const std::string& setting, int budget) {
  auto it = m.find({id, setting, budget});
  return it == m.end() ? json() : it->second;
}

class EvalCliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(fs::temp_directory_path() / absl::StrCat("spc_eval_cli_", getpid()));
    fs::remove_all(*dir_);
    fs::create_directories(*dir_);
    ModelConfig c = RandomCheckpointPreset("tiny-llama-tied-gqa").value();
    RandomCheckpointOptions o;
    o.dtype = DType::kF32;
    o.seed = 5;  // a model whose greedy outputs budget 8 changes
    o.num_threads = 2;
    ASSERT_TRUE(WriteRandomCheckpoint(c, Path("model"), o).ok());
    CliRun p = Cli({"prune", "--source", Path("model"), "--kind", "layer", "--target", Path("model"), "--out", Path("head")});
    ASSERT_EQ(p.exit_code, 0) << p.err;
    // Prompts of 60 to 200 words for the tiny model (its tokenizer splits them into more tokens).
    std::ofstream tasks(Path("tasks.jsonl")), prompts(Path("prompts.jsonl"));
    const char* words[] = {"alpha", "river", "stone", "cloud", "seven", "north", "light", "tree"};
    for (int i = 0; i < 4; ++i) {
      std::string text;
      for (int w = 0; w < 60 + 45 * i; ++w) text += absl::StrCat(words[(w * 7 + i) % 8], " ");
      tasks << json{{"id", absl::StrCat("t", i)}, {"prompt", text},       {"max_new_tokens", 16},
                    {"answers", {"river"}},        {"scoring", "contains"}, {"category", i % 2 ? "odd" : "even"},
                    {"length", 60 + 45 * i}}
                   .dump()
            << "\n";
      prompts << json{{"id", absl::StrCat("p", i)}, {"prompt", text}}.dump() << "\n";
    }
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string Path(const std::string& name) { return (*dir_ / name).string(); }
  static std::string Write(const std::string& name, const std::string& text) {
    std::ofstream(Path(name), std::ios::binary) << text;
    return Path(name);
  }
  static CliRun Eval(std::vector<std::string> extra) {
    std::vector<std::string> a = {"eval", "--threads", "2"};
    a.insert(a.end(), extra.begin(), extra.end());
    return Cli(a);
  }
  static CliRun EvalStories(const std::string& tasks, const std::string& out, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"--model", kStories, "--tokenizer", kStoriesTok, "--tasks", tasks, "--out", out};
    a.insert(a.end(), extra.begin(), extra.end());
    return Eval(a);
  }
  static CliRun EvalTiny(std::vector<std::string> extra) {
    std::vector<std::string> a = {"--model", Path("model")};
    a.insert(a.end(), extra.begin(), extra.end());
    return Eval(a);
  }
  static void ExpectError(const CliRun& r, const std::string& needle) {
    EXPECT_FALSE(r.signaled) << r.err;
    EXPECT_NE(r.exit_code, 0) << r.out;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err;
  }
  static fs::path* dir_;
};
fs::path* EvalCliTest::dir_ = nullptr;

TEST_F(EvalCliTest, TinyTasksScoreAsExpected) {
  CliRun r = EvalStories(kTinyTasks, Path("tiny.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> lines = ReadLines(Path("tiny.jsonl"));
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines[0]["type"], "run");
  EXPECT_EQ(lines[0]["items"], 6);
  auto results = Results(lines, "result");
  ASSERT_EQ(results.size(), 6u);
  const std::map<std::string, double> expected = {{"bos-lily", 1.0},  {"bos-case", 0.0},  {"bos-stop-exact", 1.0},
                                                  {"boy-all", 0.5},   {"park-line", 1.0}, {"cat-exact", 0.0}};
  for (const auto& [id, score] : expected) {
    const json j = At(results, id, "dense", 0);
    EXPECT_EQ(j["score"], score) << id << ": " << j.dump();
  }
  EXPECT_EQ(At(results, "bos-stop-exact", "dense", 0)["finish"], "stop_string");
  EXPECT_EQ(At(results, "cat-exact", "dense", 0)["meta"]["note"].get<std::string>().rfind("the output", 0), 0u);
  const std::vector<json> summary = OfType(lines, "summary");
  ASSERT_EQ(summary.size(), 3u);  // overall, from_bos/1, story/16
  EXPECT_EQ(summary[0]["category"], "*");
  EXPECT_NEAR(summary[0]["score_mean"].get<double>(), 3.5 / 6, 1e-12);
  EXPECT_NEAR(summary[0]["full_score_mean"].get<double>(), 0.5, 1e-12);
  EXPECT_NE(r.out.find("from_bos"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("eval dense: 6/6 done"), std::string::npos) << r.err;

  // One request at a time gives the same outputs as the batch.
  ASSERT_EQ(EvalStories(kTinyTasks, Path("tiny1.jsonl"), {"--max-batch", "1"}).exit_code, 0);
  auto single = Results(ReadLines(Path("tiny1.jsonl")), "result");
  for (const auto& [key, j] : results) EXPECT_EQ(single[key]["output"], j["output"]) << std::get<0>(key);
}

TEST_F(EvalCliTest, BudgetAboveEverySequenceGivesTheDenseResults) {
  CliRun r = EvalTiny({"--sparse", "--retrieval-head", Path("head"), "--budgets", "8,4096", "--dense", "--tasks",
                       Path("tasks.jsonl"), "--out", Path("sparse.jsonl")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> lines = ReadLines(Path("sparse.jsonl"));
  auto results = Results(lines, "result");
  ASSERT_EQ(results.size(), 12u);
  int differ = 0;
  for (int i = 0; i < 4; ++i) {
    const std::string id = absl::StrCat("t", i);
    const json dense = At(results, id, "dense", 0);
    EXPECT_EQ(At(results, id, "sparse", 4096)["output"], dense["output"]) << id;
    EXPECT_EQ(At(results, id, "sparse", 4096)["score"], dense["score"]) << id;
    EXPECT_EQ(At(results, id, "sparse", 4096)["generated_tokens"], dense["generated_tokens"]) << id;
    differ += At(results, id, "sparse", 8)["output"] != dense["output"];
  }
  EXPECT_GT(differ, 0) << "budget 8 should change some output of this random model";
  std::map<int, json> settings, overlap;
  for (const json& j : OfType(lines, "setting")) settings[j["budget"].is_null() ? 0 : j["budget"].get<int>()] = j;
  for (const json& j : OfType(lines, "overlap")) overlap[j["budget"].get<int>()] = j;
  EXPECT_EQ(settings[4096]["sparse_steps"], 0);
  EXPECT_GT(settings[8]["sparse_steps"], 0);
  EXPECT_EQ(settings[8]["weak_retrieval_fallback_steps"], 0);
  EXPECT_EQ(settings[8]["weak_retrieval_fallback_sequences"], 0);
  EXPECT_EQ(overlap[8]["samples"], 4 * (16 - 2));
  EXPECT_GT(overlap[8]["p50"].get<double>(), 0.0);
  EXPECT_EQ(overlap[4096]["samples"], 0);
  EXPECT_TRUE(overlap[4096]["p50"].is_null());
  EXPECT_NE(r.out.find("overlap budget=8 samples=56"), std::string::npos) << r.out;
  EXPECT_EQ(lines[0]["selection_source"], "head");
  EXPECT_EQ(lines[0]["fallback_mass"], 0.0);
}

TEST_F(EvalCliTest, SettingLineCountsWeakRetrievalFallbackSteps) {
  // Mass 1: a head that keeps 8 of more past positions always keeps less than all of its softmax mass, so every
  // sparse step falls back; the setting line says so (and the outputs are the dense ones).
  CliRun r = EvalTiny({"--sparse", "--retrieval-head", Path("head"), "--budgets", "8", "--dense", "--fallback-mass",
                       "1", "--tasks", Path("tasks.jsonl"), "--out", Path("fallback.jsonl")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> lines = ReadLines(Path("fallback.jsonl"));
  EXPECT_EQ(lines[0]["fallback_mass"], 1.0);
  std::map<int, json> settings;
  for (const json& j : OfType(lines, "setting")) settings[j["budget"].is_null() ? 0 : j["budget"].get<int>()] = j;
  ASSERT_GT(settings[8]["sparse_steps"].get<int64_t>(), 0);
  EXPECT_EQ(settings[8]["weak_retrieval_fallback_steps"], settings[8]["sparse_steps"]);
  EXPECT_EQ(settings[0]["weak_retrieval_fallback_steps"], 0);
  EXPECT_EQ(settings[0]["weak_retrieval_fallback_sequences"], 0);
  // Every sequence of every sparse step fell back: at least one per step, at most the 4 tasks per step.
  const int64_t steps = settings[8]["sparse_steps"].get<int64_t>();
  const int64_t seqs = settings[8]["weak_retrieval_fallback_sequences"].get<int64_t>();
  EXPECT_GE(seqs, steps);
  EXPECT_LE(seqs, 4 * steps);
  auto results = Results(lines, "result");
  for (int i = 0; i < 4; ++i) {
    const std::string id = absl::StrCat("t", i);
    EXPECT_EQ(At(results, id, "sparse", 8)["output"], At(results, id, "dense", 0)["output"]) << id;
  }
}

TEST_F(EvalCliTest, PerLayerSourcesRecordNoOverlap) {
  // oracle selects inside every layer: the decoder's sets are placeholders, so no overlap is reported.
  CliRun r = EvalTiny({"--sparse", "--selection-source", "oracle", "--budgets", "8", "--tasks", Path("tasks.jsonl"),
                       "--out", Path("oracle.jsonl")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> lines = ReadLines(Path("oracle.jsonl"));
  EXPECT_EQ(lines[0]["selection_source"], "oracle");
  EXPECT_TRUE(lines[0]["retrieval_head"].is_null() || lines[0]["retrieval_head"] == "");
  const std::vector<json> settings = OfType(lines, "setting");
  ASSERT_EQ(settings.size(), 1u);
  EXPECT_GT(settings[0]["sparse_steps"], 0);
  const std::vector<json> overlap = OfType(lines, "overlap");
  ASSERT_EQ(overlap.size(), 1u);
  EXPECT_EQ(overlap[0]["samples"], 0);
}

TEST_F(EvalCliTest, FidelityOfDenseNeverDiverges) {
  CliRun r = EvalTiny({"--fidelity", "--prompts", Path("prompts.jsonl"), "--max-new-tokens", "40", "--ignore-eos",
                       "--out", Path("fid.jsonl")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> lines = ReadLines(Path("fid.jsonl"));
  EXPECT_EQ(OfType(lines, "reference").size(), 4u);
  const std::vector<json> fid = OfType(lines, "fidelity");
  ASSERT_EQ(fid.size(), 4u);
  for (const json& j : fid) {
    EXPECT_TRUE(j["first_divergence"].is_null()) << j.dump();
    EXPECT_EQ(j["tokens_to_divergence"], 40);
    EXPECT_EQ(j["nll_gap"], 0.0);
  }
  const std::vector<json> summary = OfType(lines, "fidelity_summary");
  ASSERT_FALSE(summary.empty());
  EXPECT_EQ(summary[0]["diverged_mean"], 0.0);
  EXPECT_EQ(summary[0]["tokens_to_divergence_median"], 40.0);

  // Sparse at a budget above every sequence: never diverges either; a tiny budget is compared too.
  r = EvalTiny({"--fidelity", "--prompts", Path("prompts.jsonl"), "--max-new-tokens", "40", "--ignore-eos", "--sparse",
                "--retrieval-head", Path("head"), "--budgets", "4,4096", "--out", Path("fid2.jsonl")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto results = Results(ReadLines(Path("fid2.jsonl")), "fidelity");
  ASSERT_EQ(results.size(), 8u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(At(results, absl::StrCat("p", i), "sparse", 4096)["first_divergence"].is_null());
    EXPECT_GE(At(results, absl::StrCat("p", i), "sparse", 4)["dense_argmax"].get<double>(), 0.0);
  }
}

TEST_F(EvalCliTest, ChatMessagesUseTheChatTemplate) {
  const std::string f = Write("chat.jsonl", R"({"id": "c", "messages": [{"role": "user", "content": "hello there"}], )"
                                            R"("max_new_tokens": 4, "answers": ["x"], "scoring": "contains"})"
                                            "\n");
  // The tiny checkpoint has no chat template: auto refuses, a named format renders.
  ExpectError(EvalTiny({"--tasks", f, "--out", Path("chat.out")}), "has chat messages");
  CliRun r = EvalTiny({"--tasks", f, "--out", Path("chat.out"), "--chat-template", "chatml"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto results = Results(ReadLines(Path("chat.out")), "result");
  // "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n" is longer than the two words.
  EXPECT_GT(At(results, "c", "dense", 0)["prompt_tokens"].get<int>(), 10);
}

TEST_F(EvalCliTest, TokenizeCountsPromptsAsEvalDoes) {
  const std::string in = Write("tok.in", "\"hello world\"\n"
                                         "{\"messages\": [{\"role\": \"user\", \"content\": \"hello world\"}]}\n"
                                         "{\"prompt\": 3}\nnot json\n");
  CliRun r = testing::RunCli("/bin/sh", {"-c", absl::StrCat(SPECONTEXT_CLI, " tokenize --model ", Path("model"),
                                                            " --chat-template chatml < ", in)});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<json> lines;
  for (size_t pos = 0, nl; (nl = r.out.find('\n', pos)) != std::string::npos; pos = nl + 1) {
    lines.push_back(json::parse(r.out.substr(pos, nl - pos)));
  }
  ASSERT_EQ(lines.size(), 4u) << r.out;
  // The plain prompt's count is what eval reports as prompt_tokens for the same text.
  const std::string task = Write("tok.jsonl", R"({"id": "a", "prompt": "hello world", "max_new_tokens": 1, )"
                                              R"("answers": ["x"], "scoring": "exact"})" "\n");
  ASSERT_EQ(EvalTiny({"--tasks", task, "--out", Path("tok.out")}).exit_code, 0);
  EXPECT_EQ(lines[0]["tokens"], At(Results(ReadLines(Path("tok.out")), "result"), "a", "dense", 0)["prompt_tokens"]);
  EXPECT_GT(lines[1]["tokens"].get<int>(), lines[0]["tokens"].get<int>() + 5);  // the chatml turn markers
  EXPECT_NE(lines[2]["error"].get<std::string>().find("field \"prompt\": expected a string"), std::string::npos);
  EXPECT_EQ(lines[3]["error"], "not valid JSON");
}

TEST_F(EvalCliTest, BadTaskFilesNameTheLine) {
  const std::string good = R"({"id": "a", "prompt": "x", "max_new_tokens": 4, "answers": ["y"], "scoring": "exact"})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {good + "\n{\"id\": \"b\"", "bad1.jsonl:2: not valid JSON"},
      {good + "\n" + good, "bad2.jsonl:2: field \"id\": \"a\" appears on an earlier line"},
      {"\n\n" + std::string(R"({"id": "a", "prompt": "x", "max_new_tokens": -1, "answers": ["y"], "scoring": "exact"})"),
       "bad3.jsonl:3: field \"max_new_tokens\": must be in [1, 1048576], got -1"},
      {R"({"id": "a", "prompt": "x", "max_new_tokens": 4, "answers": "y", "scoring": "exact"})",
       "bad4.jsonl:1: field \"answers\": expected an array of strings"},
      {R"({"id": "a", "prompt": "x", "max_new_tokens": 4, "answers": ["y"], "scoring": "regex"})",
       "bad5.jsonl:1: field \"scoring\": unknown scoring \"regex\""},
      {"", "bad6.jsonl: no tasks"},
      {std::string("\xff\xfe{\"id\"\x00", 8), "bad7.jsonl:1: not valid JSON"},
      {R"({"id": "a", "prompt": "x", "max_new_tokens": 1048576, "answers": ["y"], "scoring": "exact"})",
       "bad8.jsonl:1 (id \"a\"): the prompt (3 tokens) plus max_new_tokens (1048576) exceed the context of 512"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string name = absl::StrCat("bad", i + 1, ".jsonl");
    CliRun r = EvalStories(Write(name, cases[i].first), Path("bad.out"));
    ExpectError(r, cases[i].second);
  }
  ExpectError(EvalStories(Path("missing.jsonl"), Path("bad.out")), "missing.jsonl");
}

TEST_F(EvalCliTest, BadFlagsGiveClearErrors) {
  ExpectError(Eval({"--model", kStories, "--tokenizer", kStoriesTok, "--tasks", kTinyTasks}), "--out FILE is required");
  ExpectError(Eval({"--model", kStories, "--tokenizer", kStoriesTok, "--out", Path("x")}), "give --tasks FILE");
  ExpectError(EvalStories(kTinyTasks, Path("x"), {"--budgets", "128"}), "--budgets and --dense need --sparse");
  ExpectError(EvalStories(kTinyTasks, Path("x"), {"--fidelity"}), "--fidelity needs --prompts");
  ExpectError(EvalStories(kTinyTasks, Path("x"), {"--max-batch", "0"}), "--max-batch must be in [1, 4096]");
  ExpectError(EvalStories(kTinyTasks, "/nonexistent-dir/x.jsonl"), "/nonexistent-dir/x.jsonl");
  ExpectError(EvalTiny({"--tasks", Path("tasks.jsonl"), "--out", Path("x"), "--sparse", "--retrieval-head",
                        Path("head"), "--budgets", "128,9000"}),
              "--budgets: 9000 exceeds the model's context of 4096");
  ExpectError(EvalTiny({"--tasks", Path("tasks.jsonl"), "--out", Path("x"), "--sparse", "--retrieval-head",
                        Path("head"), "--budget", "128"}),
              "eval takes --budgets LIST");
  ExpectError(EvalTiny({"--tasks", Path("tasks.jsonl"), "--out", Path("x"), "--sparse", "--budgets", "128"}),
              "--retrieval-head");
  ExpectError(EvalTiny({"--fidelity", "--prompts", Path("tasks.jsonl"), "--out", Path("x")}),
              "tasks.jsonl:1: field \"answers\": unknown field of a prompt");
}

}  // namespace
}  // namespace specontext
