#include "core/eval/tasks.h"

#include <algorithm>
#include <span>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;

// Collects the parser's message for a line that is not JSON (json::parse without exceptions only says that
// it failed); accepts everything else without building a value.
class SyntaxErrorSax : public nlohmann::json_sax<json> {
 public:
  std::string message;
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return true; }
  bool key(string_t&) override { return true; }
  bool end_object() override { return true; }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) override {
    message = ex.what();
    return false;
  }
};

std::string TypeName(const json& v) {
  if (v.is_number_integer()) return "an integer";
  if (v.is_number_float()) return "a number";
  return absl::StrCat("a", v.is_array() || v.is_object() ? "n " : " ", v.type_name());
}

// Messages of one line: "SOURCE:LINE: field "F": problem".
class LineErrors {
 public:
  LineErrors(std::string_view source, int32_t line) : prefix_(absl::StrCat(std::string(source), ":", line, ": ")) {}
  absl::Status Line(const std::string& problem) const {
    return absl::InvalidArgumentError(absl::StrCat(prefix_, problem));
  }
  absl::Status Field(const std::string& field, const std::string& problem) const {
    return Line(absl::StrCat("field \"", field, "\": ", problem));
  }
  absl::Status Type(const std::string& field, const std::string& expected, const json& got) const {
    return Field(field, absl::StrCat("expected ", expected, ", got ", TypeName(got)));
  }

 private:
  std::string prefix_;
};

absl::StatusOr<std::string> Label(const LineErrors& err, const std::string& field, const json& v, bool allow_integer) {
  std::string s;
  if (v.is_string()) {
    s = v.get<std::string>();
  } else if (allow_integer && v.is_number_integer()) {
    s = v.dump();
  } else {
    return err.Type(field, allow_integer ? "a string or an integer" : "a string", v);
  }
  if (s.size() > kMaxTaskLabelBytes) {
    return err.Field(field, absl::StrCat("longer than ", kMaxTaskLabelBytes, " bytes"));
  }
  return s;
}

absl::StatusOr<std::vector<std::string>> StringList(const LineErrors& err, const std::string& field, const json& v,
                                                    size_t max_items, bool allow_empty_list) {
  if (!v.is_array()) return err.Type(field, "an array of strings", v);
  if (v.empty() && !allow_empty_list) return err.Field(field, "must hold at least one string");
  if (v.size() > max_items) return err.Field(field, absl::StrCat("more than ", max_items, " items"));
  std::vector<std::string> out;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string item = absl::StrCat(field, "[", i, "]");
    if (!v[i].is_string()) return err.Type(item, "a string", v[i]);
    out.push_back(v[i].get<std::string>());
    if (out.back().empty()) return err.Field(item, "must not be empty");
  }
  return out;
}

absl::StatusOr<std::vector<ChatMessage>> Messages(const LineErrors& err, const json& v) {
  if (!v.is_array()) return err.Type("messages", "an array of {\"role\", \"content\"} objects", v);
  if (v.empty()) return err.Field("messages", "must hold at least one message");
  if (v.size() > kMaxTaskMessages) return err.Field("messages", absl::StrCat("more than ", kMaxTaskMessages, " messages"));
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string item = absl::StrCat("messages[", i, "]");
    const json& m = v[i];
    if (!m.is_object()) return err.Type(item, "an object {\"role\", \"content\"}", m);
    for (const auto& [k, val] : m.items()) {
      if (k != "role" && k != "content") return err.Field(absl::StrCat(item, ".", k), "unknown (role, content)");
    }
    if (!m.contains("role")) return err.Field(absl::StrCat(item, ".role"), "missing");
    if (!m.contains("content")) return err.Field(absl::StrCat(item, ".content"), "missing");
    if (!m["role"].is_string()) return err.Type(absl::StrCat(item, ".role"), "a string", m["role"]);
    if (!m["content"].is_string()) return err.Type(absl::StrCat(item, ".content"), "a string", m["content"]);
    ChatMessage msg{m["role"].get<std::string>(), m["content"].get<std::string>()};
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant") {
      return err.Field(absl::StrCat(item, ".role"), absl::StrCat("\"", msg.role, "\" is not system, user or assistant"));
    }
    out.push_back(std::move(msg));
  }
  // The model answers the conversation: it must end with the user's turn.
  if (out.back().role != "user") return err.Field("messages", "the last message must have the role \"user\"");
  return out;
}

constexpr std::string_view kTaskFields[] = {"id",      "prompt",  "messages",       "max_new_tokens",
                                            "answers", "scoring", "case_sensitive", "stop",
                                            "length",  "category", "meta"};
constexpr std::string_view kPromptFields[] = {"id", "prompt", "messages", "max_new_tokens", "length", "category",
                                              "meta"};

absl::StatusOr<EvalTask> ParseTask(const json& j, const LineErrors& err, TaskFileKind kind) {
  if (!j.is_object()) return err.Line(absl::StrCat("expected a JSON object (one per line), got ", TypeName(j)));
  const std::span<const std::string_view> known =
      kind == TaskFileKind::kTasks ? std::span<const std::string_view>(kTaskFields) : kPromptFields;
  for (const auto& [k, v] : j.items()) {
    if (std::find(known.begin(), known.end(), k) == known.end()) {
      std::string names;
      for (std::string_view f : known) names += absl::StrCat(names.empty() ? "" : ", ", std::string(f));
      return err.Field(k, absl::StrCat("unknown field of a ", kind == TaskFileKind::kTasks ? "task" : "prompt", " (",
                                       names, ")"));
    }
  }
  EvalTask t;
  if (!j.contains("id")) return err.Field("id", "missing");
  ASSIGN_OR_RETURN(t.id, Label(err, "id", j["id"], /*allow_integer=*/true));
  if (t.id.empty()) return err.Field("id", "must not be empty");
  if (j.contains("prompt") == j.contains("messages")) {
    return err.Line("give exactly one of the fields \"prompt\" (plain text) and \"messages\" (chat)");
  }
  if (j.contains("prompt")) {
    if (!j["prompt"].is_string()) return err.Type("prompt", "a string", j["prompt"]);
    t.prompt = j["prompt"].get<std::string>();
  } else {
    ASSIGN_OR_RETURN(t.messages, Messages(err, j["messages"]));
  }
  if (j.contains("length")) {
    ASSIGN_OR_RETURN(t.length, Label(err, "length", j["length"], /*allow_integer=*/true));
  }
  if (j.contains("category")) {
    ASSIGN_OR_RETURN(t.category, Label(err, "category", j["category"], /*allow_integer=*/false));
  }
  if (j.contains("meta")) t.meta_json = j["meta"].dump();
  if (!j.contains("max_new_tokens")) {
    if (kind == TaskFileKind::kPrompts) return t;  // the command's --max-new-tokens
    return err.Field("max_new_tokens", "missing");
  }
  const json& mnt = j["max_new_tokens"];
  if (!mnt.is_number_integer()) return err.Type("max_new_tokens", "a positive integer", mnt);
  // Non-negative values arrive as unsigned (those past INT64_MAX must not wrap when read as int64).
  const bool in_range = mnt.is_number_unsigned()
                            ? mnt.get<uint64_t>() >= 1 && mnt.get<uint64_t>() <= static_cast<uint64_t>(kMaxTaskNewTokens)
                            : mnt.get<int64_t>() >= 1 && mnt.get<int64_t>() <= kMaxTaskNewTokens;
  if (!in_range) {
    return err.Field("max_new_tokens", absl::StrCat("must be in [1, ", kMaxTaskNewTokens, "], got ", mnt.dump()));
  }
  t.max_new_tokens = static_cast<int32_t>(mnt.get<int64_t>());
  if (kind == TaskFileKind::kPrompts) return t;
  if (!j.contains("answers")) return err.Field("answers", "missing");
  ASSIGN_OR_RETURN(t.answers, StringList(err, "answers", j["answers"], kMaxTaskAnswers, /*allow_empty_list=*/false));
  if (!j.contains("scoring")) return err.Field("scoring", "missing");
  if (!j["scoring"].is_string()) return err.Type("scoring", "a string", j["scoring"]);
  absl::StatusOr<Scoring> scoring = ParseScoring(j["scoring"].get<std::string>());
  if (!scoring.ok()) return err.Field("scoring", std::string(scoring.status().message()));
  t.scoring = *scoring;
  if (j.contains("case_sensitive")) {
    if (!j["case_sensitive"].is_boolean()) return err.Type("case_sensitive", "true or false", j["case_sensitive"]);
    t.case_sensitive = j["case_sensitive"].get<bool>();
  }
  if (j.contains("stop")) {
    ASSIGN_OR_RETURN(t.stop, StringList(err, "stop", j["stop"], kMaxTaskAnswers, /*allow_empty_list=*/true));
  }
  return t;
}

}  // namespace

absl::StatusOr<std::vector<EvalTask>> ParseEvalTasks(std::string_view text, std::string_view source,
                                                     TaskFileKind kind) {
  std::vector<EvalTask> tasks;
  absl::flat_hash_set<std::string> ids;
  int32_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    pos = nl == std::string_view::npos ? text.size() : nl + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);  // CRLF files
    if (line.find_first_not_of(" \t") == std::string_view::npos) continue;
    const LineErrors err(source, line_no);
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      SyntaxErrorSax sax;
      json::sax_parse(line, &sax);
      return err.Line(absl::StrCat("not valid JSON (", sax.message, ")"));
    }
    ASSIGN_OR_RETURN(EvalTask t, ParseTask(j, err, kind));
    t.line = line_no;
    if (!ids.insert(t.id).second) return err.Field("id", absl::StrCat("\"", t.id, "\" appears on an earlier line"));
    tasks.push_back(std::move(t));
  }
  if (tasks.empty()) return absl::InvalidArgumentError(absl::StrCat(std::string(source), ": no tasks (one JSON object per line)"));
  return tasks;
}

absl::StatusOr<std::vector<EvalTask>> ReadEvalTasks(const std::string& path, TaskFileKind kind) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxTaskFileBytes));
  return ParseEvalTasks(text, path, kind);
}

}  // namespace specontext
