// Evaluation task files (docs/accuracy.md): JSON Lines, one task per line, each a prompt (plain text or chat
// messages), a generation length, the accepted answers and how an output is scored against them. Parsing
// validates every field and names the file, line and field of the first problem, so that a task file written
// by someone else fails with a message rather than a wrong number.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/eval/scoring.h"
#include "core/tokenizer/chat_template.h"

namespace specontext {

// Limits of one task, so that a hostile or broken file cannot make the tool allocate without bound.
inline constexpr int32_t kMaxTaskNewTokens = 1 << 20;
inline constexpr size_t kMaxTaskAnswers = 4096;
inline constexpr size_t kMaxTaskMessages = 4096;
inline constexpr size_t kMaxTaskLabelBytes = 256;  // id, category, length
inline constexpr size_t kMaxTaskFileBytes = size_t{1} << 30;

struct EvalTask {
  int32_t line = 0;                   // 1-based line of the task file
  std::string id;                     // unique within the file
  std::string prompt;                 // plain text, encoded as the model's tokenizer does by default (BOS)
  std::vector<ChatMessage> messages;  // chat: rendered with the chat template; empty for a plain prompt
  int32_t max_new_tokens = 0;
  std::vector<std::string> answers;   // accepted answers, non-empty
  Scoring scoring = Scoring::kContainsAll;
  bool case_sensitive = false;
  std::vector<std::string> stop;      // stop strings (the output ends before the first one)
  std::string length;                 // grouping label for the summary ("" = none), e.g. "4096"
  std::string category;               // grouping label for the summary ("" = none), e.g. "niah_single"
  std::string meta_json;              // the optional "meta" value, serialized; copied to the results
  bool chat() const { return !messages.empty(); }
};

/// What a file holds: scored tasks, or prompts for the long-generation fidelity runs (id, prompt or
/// messages, optional max_new_tokens, length, category and meta; no answers).
enum class TaskFileKind : uint8_t { kTasks, kPrompts };

/// Parses a whole task file (JSON Lines; blank lines are skipped). `source` names the file in messages,
/// which read "SOURCE:LINE: field \"F\": problem". InvalidArgument on the first bad line; an empty file
/// (no task) is an error too. In a prompts file max_new_tokens is optional (0 when absent).
absl::StatusOr<std::vector<EvalTask>> ParseEvalTasks(std::string_view text, std::string_view source,
                                                     TaskFileKind kind = TaskFileKind::kTasks);
/// Reads and parses a task file.
absl::StatusOr<std::vector<EvalTask>> ReadEvalTasks(const std::string& path, TaskFileKind kind = TaskFileKind::kTasks);

/// The score of `output` for `task` in [0, 1] (see Scoring).
inline double ScoreOutput(const EvalTask& task, std::string_view output) {
  return ScoreText(task.scoring, task.case_sensitive, task.answers, output);
}

}  // namespace specontext
