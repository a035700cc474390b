// Task accuracy through the Engine: each task's prompt (plain text, or chat messages rendered with the model's
// chat template) is decoded greedily under one setting (dense, or sparse at a budget) and its output scored.
// The tasks of a setting run together with continuous batching (BatchRunner); each request carries its own
// budget or `dense`, exactly as a served request would.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/eval/batch_runner.h"
#include "core/eval/tasks.h"
#include "core/runtime/runtime.h"

namespace specontext {

/// One way of decoding: dense attention, or sparse at `budget` past tokens per KV head.
struct EvalSetting {
  bool dense = true;
  int32_t budget = 0;  // sparse only
  /// "dense" or "sparse" (the budget is reported apart).
  std::string_view name() const { return dense ? "dense" : "sparse"; }
};

/// The request a task becomes under `setting`: greedy, the task's max_new_tokens and stop strings.
GenerationRequest TaskRequest(const EvalTask& task, std::vector<int32_t> prompt, const EvalSetting& setting);

/// Token ids of every task's prompt: chat messages rendered with `chat` (required when a task has
/// messages; null otherwise refuses them), plain prompts with the tokenizer's default BOS. Checks that the
/// prompt plus max_new_tokens (or `default_new_tokens` when the task has none) fits in `context`. Errors name
/// the file (`source`), the task's line and its id.
absl::StatusOr<std::vector<std::vector<int32_t>>> EncodeTaskPrompts(const Runtime& runtime, const ChatTemplate* chat,
                                                                    std::span<const EvalTask> tasks,
                                                                    std::string_view source, int64_t context,
                                                                    int32_t default_new_tokens = 0);

struct TaskResult {
  size_t task = 0;  // index into the tasks
  int32_t prompt_tokens = 0;
  BatchOutcome outcome;
  double score = 0;
};

/// Runs every task under `setting`, at most `max_in_flight` at once, and calls `on_result` (this thread) as
/// each one finishes. `prompts` parallel to `tasks`.
absl::StatusOr<BatchRunStats> RunTasks(BatchRunner& runner, std::span<const EvalTask> tasks,
                                       std::span<const std::vector<int32_t>> prompts, const EvalSetting& setting,
                                       int32_t max_in_flight, const std::function<void(TaskResult)>& on_result);

/// "FILE:LINE (id "X")", how messages name a task.
std::string TaskName(std::string_view source, const EvalTask& task);

}  // namespace specontext
