#include "core/eval/task_eval.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {

std::string TaskName(std::string_view source, const EvalTask& task) {
  return absl::StrCat(std::string(source), ":", task.line, " (id \"", task.id, "\")");
}

GenerationRequest TaskRequest(const EvalTask& task, std::vector<int32_t> prompt, const EvalSetting& setting) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.sampling = SamplingParams{};  // greedy
  r.max_new_tokens = task.max_new_tokens;
  r.stop_strings = task.stop;
  r.dense = setting.dense;
  r.budget = setting.dense ? 0 : setting.budget;
  return r;
}

absl::StatusOr<std::vector<std::vector<int32_t>>> EncodeTaskPrompts(const Runtime& rt, const ChatTemplate* chat,
                                                                    std::span<const EvalTask> tasks,
                                                                    std::string_view source, int64_t context,
                                                                    int32_t default_new_tokens) {
  std::vector<std::vector<int32_t>> prompts;
  prompts.reserve(tasks.size());
  for (const EvalTask& t : tasks) {
    auto fail = [&](const absl::Status& st) {
      return absl::Status(st.code(), absl::StrCat(TaskName(source, t), ": ", st.message()));
    };
    if (t.chat() && chat == nullptr) {
      return fail(absl::InvalidArgumentError("chat messages need a chat template (--chat-template)"));
    }
    absl::StatusOr<std::vector<int32_t>> ids =
        t.chat() ? EncodeChatPrompt(rt, *chat, t.messages) : EncodePrompt(rt, t.prompt);
    if (!ids.ok()) return fail(ids.status());
    const int64_t new_tokens = t.max_new_tokens > 0 ? t.max_new_tokens : default_new_tokens;
    if (static_cast<int64_t>(ids->size()) + new_tokens > context) {
      return fail(absl::InvalidArgumentError(absl::StrCat("the prompt (", ids->size(), " tokens) plus max_new_tokens (",
                                                          new_tokens, ") exceed the context of ", context, " tokens")));
    }
    prompts.push_back(*std::move(ids));
  }
  return prompts;
}

absl::StatusOr<BatchRunStats> RunTasks(BatchRunner& runner, std::span<const EvalTask> tasks,
                                       std::span<const std::vector<int32_t>> prompts, const EvalSetting& setting,
                                       int32_t max_in_flight, const std::function<void(TaskResult)>& on_result) {
  if (prompts.size() != tasks.size()) return absl::InvalidArgumentError("one prompt per task");
  std::vector<GenerationRequest> requests;
  requests.reserve(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) requests.push_back(TaskRequest(tasks[i], prompts[i], setting));
  return runner.Run(
      std::move(requests), max_in_flight, [&](size_t i) { return absl::StrCat("task \"", tasks[i].id, "\""); },
      [&](size_t i, BatchOutcome outcome) {
        TaskResult r;
        r.task = i;
        r.prompt_tokens = static_cast<int32_t>(prompts[i].size());
        r.score = ScoreOutput(tasks[i], outcome.text);
        r.outcome = std::move(outcome);
        on_result(std::move(r));
      });
}

}  // namespace specontext
