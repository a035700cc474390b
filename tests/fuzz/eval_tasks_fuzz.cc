// Fuzzes the evaluation task-file parser (both kinds). Invariants: an error names the file and a line that
// exists ("f.jsonl:N: ..." with 1 <= N <= lines) or the file as a whole ("f.jsonl: no tasks"); accepted tasks
// satisfy the documented field rules, and scoring any text against them stays in [0, 1].
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/eval/tasks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace specontext;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  size_t lines = 1;
  for (char c : text) lines += c == '\n';
  for (TaskFileKind kind : {TaskFileKind::kTasks, TaskFileKind::kPrompts}) {
    absl::StatusOr<std::vector<EvalTask>> r = ParseEvalTasks(text, "f.jsonl", kind);
    if (!r.ok()) {
      const std::string msg(r.status().message());
      if (msg.rfind("f.jsonl: no tasks", 0) == 0) continue;
      if (msg.rfind("f.jsonl:", 0) != 0) std::abort();
      const size_t line = std::strtoul(msg.c_str() + 8, nullptr, 10);
      if (line < 1 || line > lines) std::abort();
      continue;
    }
    for (const EvalTask& t : *r) {
      if (t.id.empty() || t.line < 1 || static_cast<size_t>(t.line) > lines) std::abort();
      if (t.chat() == t.messages.empty() || (t.chat() && t.messages.back().role != "user")) std::abort();
      if (kind == TaskFileKind::kPrompts) continue;
      if (t.max_new_tokens < 1 || t.max_new_tokens > kMaxTaskNewTokens || t.answers.empty()) std::abort();
      const double s = ScoreOutput(t, text);
      if (!(s >= 0 && s <= 1)) std::abort();
    }
  }
  return 0;
}
