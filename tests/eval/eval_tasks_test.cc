// The task-file parser and the scoring rules: every field validated with the line and field named, and a
// property test that feeds it mutated lines (wrong types, huge and negative values, truncation, random bytes,
// deep nesting) and requires either tasks that satisfy the documented invariants or such an error.
#include <gtest/gtest.h>

#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/eval/tasks.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;

json GoodTask() {
  return {{"id", "t1"}, {"prompt", "Say hi."}, {"max_new_tokens", 16}, {"answers", {"hi"}}, {"scoring", "contains"}};
}

std::string Lines(const std::vector<json>& tasks) {
  std::string s;
  for (const json& t : tasks) s += t.dump() + "\n";
  return s;
}

// The error for a file whose line 2 is `bad` (line 1 is a good task).
std::string ErrorOn2(const std::string& bad) {
  absl::StatusOr<std::vector<EvalTask>> r = ParseEvalTasks(GoodTask().dump() + "\n" + bad + "\n", "f.jsonl");
  EXPECT_FALSE(r.ok()) << bad;
  return r.ok() ? "" : std::string(r.status().message());
}

std::string With(const std::string& field, const json& value) {
  json t = GoodTask();
  t["id"] = "t2";
  t[field] = value;
  return t.dump();
}

std::string Without(const std::string& field) {
  json t = GoodTask();
  t["id"] = "t2";
  t.erase(field);
  return t.dump();
}

TEST(EvalTasks, ParsesEveryField) {
  json chat = {{"id", 7},
               {"messages", {{{"role", "system"}, {"content", "Be brief."}}, {{"role", "user"}, {"content", "2+2?"}}}},
               {"max_new_tokens", 4},
               {"answers", {"4", "four"}},
               {"scoring", "first_line_exact"},
               {"case_sensitive", true},
               {"stop", {"\n\n"}},
               {"length", 4096},
               {"category", "math"},
               {"meta", {{"seed", 1}, {"depth", 0.5}}}};
  auto r = ParseEvalTasks(Lines({GoodTask(), chat}) + "\n  \r\n", "f.jsonl");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  const EvalTask& a = (*r)[0];
  EXPECT_EQ(a.line, 1);
  EXPECT_EQ(a.id, "t1");
  EXPECT_EQ(a.prompt, "Say hi.");
  EXPECT_FALSE(a.chat());
  EXPECT_EQ(a.scoring, Scoring::kContains);
  EXPECT_FALSE(a.case_sensitive);
  const EvalTask& b = (*r)[1];
  EXPECT_EQ(b.line, 2);
  EXPECT_EQ(b.id, "7");
  ASSERT_EQ(b.messages.size(), 2u);
  EXPECT_EQ(b.messages[1].content, "2+2?");
  EXPECT_EQ(b.max_new_tokens, 4);
  EXPECT_EQ(b.answers, (std::vector<std::string>{"4", "four"}));
  EXPECT_EQ(b.scoring, Scoring::kFirstLineExact);
  EXPECT_TRUE(b.case_sensitive);
  EXPECT_EQ(b.stop, (std::vector<std::string>{"\n\n"}));
  EXPECT_EQ(b.length, "4096");
  EXPECT_EQ(b.category, "math");
  EXPECT_EQ(json::parse(b.meta_json)["seed"], 1);
}

TEST(EvalTasks, CrlfAndBlankLinesKeepLineNumbers) {
  auto r = ParseEvalTasks("\r\n" + GoodTask().dump() + "\r\n\r\n" + With("id", "x") + "\r\n", "f.jsonl");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].line, 2);
  EXPECT_EQ((*r)[1].line, 4);
}

TEST(EvalTasks, EveryProblemNamesLineAndField) {
  struct Case {
    std::string line, needle;
  };
  const std::vector<Case> cases = {
      {"{not json", "f.jsonl:2: not valid JSON"},
      {"[1, 2]", "f.jsonl:2: expected a JSON object"},
      {"\"text\"", "expected a JSON object"},
      {Without("id"), "f.jsonl:2: field \"id\": missing"},
      {With("id", ""), "field \"id\": must not be empty"},
      {With("id", 1.5), "field \"id\": expected a string or an integer, got a number"},
      {With("id", "t1"), "field \"id\": \"t1\" appears on an earlier line"},
      {With("id", std::string(300, 'x')), "field \"id\": longer than 256 bytes"},
      {Without("prompt"), "f.jsonl:2: give exactly one of the fields \"prompt\""},
      {With("messages", json::array()), "give exactly one of"},
      {With("prompt", 3), "field \"prompt\": expected a string, got an integer"},
      {Without("max_new_tokens"), "field \"max_new_tokens\": missing"},
      {With("max_new_tokens", 0), "field \"max_new_tokens\": must be in [1, 1048576], got 0"},
      {With("max_new_tokens", -5), "must be in [1, 1048576], got -5"},
      {With("max_new_tokens", 1u << 21), "must be in [1, 1048576]"},
      {With("max_new_tokens", 18446744073709551615ull), "got 18446744073709551615"},
      {With("max_new_tokens", 16.0), "field \"max_new_tokens\": expected a positive integer, got a number"},
      {With("max_new_tokens", "16"), "expected a positive integer, got a string"},
      {Without("answers"), "field \"answers\": missing"},
      {With("answers", "hi"), "field \"answers\": expected an array of strings, got a string"},
      {With("answers", json::array()), "field \"answers\": must hold at least one string"},
      {With("answers", {"a", 2}), "field \"answers[1]\": expected a string, got an integer"},
      {With("answers", {"a", ""}), "field \"answers[1]\": must not be empty"},
      {Without("scoring"), "field \"scoring\": missing"},
      {With("scoring", "fuzzy"), "field \"scoring\": unknown scoring \"fuzzy\""},
      {With("scoring", json::array()), "field \"scoring\": expected a string, got an array"},
      {With("case_sensitive", "yes"), "field \"case_sensitive\": expected true or false"},
      {With("stop", {""}), "field \"stop[0]\": must not be empty"},
      {With("category", 5), "field \"category\": expected a string, got an integer"},
      {With("length", json::object()), "field \"length\": expected a string or an integer, got an object"},
      {With("answer", {"x"}), "field \"answer\": unknown field of a task"},
  };
  for (const Case& c : cases) {
    const std::string msg = ErrorOn2(c.line);
    EXPECT_NE(msg.find(c.needle), std::string::npos) << "line: " << c.line << "\nmessage: " << msg;
  }
}

TEST(EvalTasks, ChatMessagesAreChecked) {
  json t = GoodTask();
  t.erase("prompt");
  t["id"] = "t9";
  auto err = [&](const json& messages) {
    t["messages"] = messages;
    return ErrorOn2(t.dump());
  };
  EXPECT_NE(err({{{"role", "user"}}}).find("field \"messages[0].content\": missing"), std::string::npos);
  EXPECT_NE(err({{{"role", "robot"}, {"content", "x"}}}).find("\"robot\" is not system, user or assistant"),
            std::string::npos);
  EXPECT_NE(err({{{"role", "user"}, {"content", "x"}, {"name", "n"}}}).find("messages[0].name"), std::string::npos);
  EXPECT_NE(err({{{"role", "user"}, {"content", "x"}}, {{"role", "assistant"}, {"content", "y"}}})
                .find("the last message must have the role \"user\""),
            std::string::npos);
  EXPECT_NE(err({"hello"}).find("field \"messages[0]\": expected an object"), std::string::npos);
}

TEST(EvalTasks, EmptyFileAndPromptsFiles) {
  EXPECT_NE(std::string(ParseEvalTasks("\n \n", "e.jsonl").status().message()).find("e.jsonl: no tasks"),
            std::string::npos);
  auto p = ParseEvalTasks(R"({"id": "p", "prompt": "Tell a story."})", "p.jsonl", TaskFileKind::kPrompts);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ((*p)[0].max_new_tokens, 0);
  auto bad = ParseEvalTasks(GoodTask().dump(), "p.jsonl", TaskFileKind::kPrompts);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("unknown field of a prompt"), std::string::npos);
}

TEST(EvalTasks, Scoring) {
  const std::vector<std::string> ab = {"Alpha", "beta"};
  EXPECT_EQ(ScoreText(Scoring::kContains, false, ab, "the ALPHA wolf"), 1.0);
  EXPECT_EQ(ScoreText(Scoring::kContains, true, ab, "the ALPHA wolf"), 0.0);
  EXPECT_EQ(ScoreText(Scoring::kContainsAll, false, ab, "alpha only"), 0.5);
  EXPECT_EQ(ScoreText(Scoring::kContainsAll, false, ab, "beta, then alpha"), 1.0);
  EXPECT_EQ(ScoreText(Scoring::kContainsAll, false, ab, ""), 0.0);
  EXPECT_EQ(ScoreText(Scoring::kExact, false, ab, "  alpha \n"), 1.0);
  EXPECT_EQ(ScoreText(Scoring::kExact, false, ab, "alpha beta"), 0.0);
  EXPECT_EQ(ScoreText(Scoring::kFirstLineExact, false, ab, "\n  Beta \nmore text"), 1.0);
  EXPECT_EQ(ScoreText(Scoring::kFirstLineExact, false, ab, "beta is it"), 0.0);
  EXPECT_EQ(ScoreText(Scoring::kExact, false, {}, "x"), 0.0);
  for (Scoring s : {Scoring::kExact, Scoring::kFirstLineExact, Scoring::kContains, Scoring::kContainsAll}) {
    EXPECT_EQ(*ParseScoring(ScoringName(s)), s);
  }
}

// Random JSON values of every type, including huge numbers and deep nesting.
json RandomValue(std::mt19937& rng, int depth = 0) {
  switch (rng() % 12) {
    case 0: return nullptr;
    case 1: return rng() % 2 == 0;
    case 2: return static_cast<int64_t>(rng()) - (int64_t{1} << 31);
    case 3: return std::numeric_limits<int64_t>::max();
    case 4: return std::numeric_limits<uint64_t>::max();
    case 5: return 1e300 * (rng() % 2 ? 1 : -1);
    case 6: return std::string(rng() % 3 == 0 ? 5000 : rng() % 8, 'a' + static_cast<char>(rng() % 26));
    case 7: return depth < 6 ? json::array({RandomValue(rng, depth + 1), RandomValue(rng, depth + 1)}) : json::array();
    case 8: return depth < 6 ? json{{"role", RandomValue(rng, depth + 1)}, {"content", RandomValue(rng, depth + 1)}}
                             : json::object();
    case 9: return json::array({"a", "b"});
    case 10: return 1 + static_cast<int>(rng() % 64);
    default: return "contains";
  }
}

TEST(EvalTasks, MutatedLinesParseOrNameTheirLine) {
  std::mt19937 rng(1234);
  const std::vector<std::string> fields = {"id",      "prompt",  "messages", "max_new_tokens", "answers", "scoring",
                                           "case_sensitive", "stop", "length",   "category",       "meta",    "extra"};
  int ok = 0, errors = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    json t = GoodTask();
    t["id"] = "m";
    std::string line;
    const int kind = static_cast<int>(rng() % 5);
    if (kind <= 1) {  // replace or remove fields
      for (int k = 0; k < 1 + static_cast<int>(rng() % 3); ++k) {
        const std::string& f = fields[rng() % fields.size()];
        if (rng() % 4 == 0) {
          t.erase(f);
        } else {
          t[f] = RandomValue(rng);
        }
      }
      line = t.dump();
    } else if (kind == 2) {  // truncated
      line = t.dump();
      line.resize(rng() % line.size());
    } else if (kind == 3) {  // random bytes spliced in (invalid UTF-8, NUL, quotes, braces)
      line = t.dump();
      for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k) {
        line.insert(line.begin() + rng() % (line.size() + 1), static_cast<char>(rng() % 256));
      }
    } else {  // deep nesting
      const int n = 1 + static_cast<int>(rng() % (iter % 50 == 0 ? 100000 : 200));
      line = std::string(n, '[') + std::string(rng() % 2 ? n : n / 2, ']');
    }
    if (line.find('\n') != std::string::npos || line.find('\r') != std::string::npos) continue;
    auto r = ParseEvalTasks(GoodTask().dump() + "\n\n" + line + "\n", "m.jsonl");
    if (!r.ok()) {
      ++errors;
      const std::string msg(r.status().message());
      EXPECT_EQ(msg.rfind("m.jsonl:3: ", 0), 0u) << line.substr(0, 200) << "\n" << msg;
      continue;
    }
    ++ok;
    for (const EvalTask& task : *r) {
      EXPECT_GE(task.max_new_tokens, 1);
      EXPECT_LE(task.max_new_tokens, kMaxTaskNewTokens);
      EXPECT_FALSE(task.answers.empty());
      EXPECT_FALSE(task.id.empty());
      EXPECT_NE(task.chat(), task.messages.empty());
      if (task.chat()) EXPECT_EQ(task.messages.back().role, "user");
    }
  }
  EXPECT_GT(ok, 100);
  EXPECT_GT(errors, 1000);
}

}  // namespace
}  // namespace specontext
