// The two runs of `specontext eval` once everything is loaded: every setting over the tasks (scores), or the
// fidelity comparison over the prompts; each writes its result lines, setting and overlap lines and the
// summaries to the results file, the summary table to stdout and a progress line to stderr.
#pragma once

#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/eval/batch_runner.h"
#include "core/eval/task_eval.h"
#include "nlohmann/json.hpp"

namespace specontext {

/// A JSON Lines output file, flushed line by line (results survive an interrupted run).
class JsonlWriter {
 public:
  static absl::StatusOr<JsonlWriter> Open(const std::string& path);
  JsonlWriter(JsonlWriter&& other) noexcept : path_(std::move(other.path_)), f_(other.f_) { other.f_ = nullptr; }
  JsonlWriter& operator=(JsonlWriter&&) = delete;
  ~JsonlWriter();
  absl::Status Write(const nlohmann::ordered_json& line);

 private:
  JsonlWriter(std::string path, FILE* f) : path_(std::move(path)), f_(f) {}
  std::string path_;
  FILE* f_;
};

/// {"setting": "dense"|"sparse", "budget": B|null}
nlohmann::ordered_json SettingJson(const EvalSetting& setting);

struct EvalInputs {
  std::string file;                                 // --tasks / --prompts, for messages
  std::span<const EvalTask> tasks;
  std::span<const std::vector<int32_t>> prompts;    // parallel to tasks
  std::span<const EvalSetting> settings;
  int32_t max_in_flight = 8;
};

absl::Status RunTaskSettings(const EvalInputs& in, BatchRunner& runner, JsonlWriter& out);
/// `max_new_tokens`: for prompts whose line gives none.
absl::Status RunFidelitySettings(const EvalInputs& in, int32_t max_new_tokens, bool ignore_eos, BatchRunner& runner,
                                 JsonlWriter& out);

}  // namespace specontext
