#include "tools/specontext/eval_run.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "core/eval/fidelity.h"
#include "core/status_macros.h"
#include "tools/specontext/eval_report.h"

namespace specontext {
namespace {

using json = nlohmann::ordered_json;

// A progress line on stderr: rewritten in place on a terminal (at most 5 times a second), else one line per
// tenth of the items so that logs stay short.
class Progress {
 public:
  Progress(std::string label, size_t total) : label_(std::move(label)), total_(total), tty_(isatty(STDERR_FILENO)) {}
  void Update(size_t done, int64_t tokens) {
    const absl::Time now = absl::Now();
    const bool tenth = total_ > 0 && done * 10 / total_ != last_done_ * 10 / total_;
    if (tty_ ? now - last_ < absl::Milliseconds(200) && done < total_ : !tenth) return;
    last_ = now;
    last_done_ = done;
    const double s = absl::ToDoubleSeconds(now - start_);
    std::fprintf(stderr, "eval %s: %zu/%zu done, %lld tokens, %.1f s, %.1f tokens/s%s", label_.c_str(), done, total_,
                 static_cast<long long>(tokens), s, s > 0 ? tokens / s : 0.0, tty_ && done < total_ ? "\r" : "\n");
    std::fflush(stderr);
  }

 private:
  std::string label_;
  size_t total_;
  bool tty_;
  size_t last_done_ = 0;
  absl::Time start_ = absl::Now(), last_ = absl::InfinitePast();
};

std::string Label(const EvalSetting& s) { return s.dense ? "dense" : absl::StrCat("sparse budget=", s.budget); }

json TaskJson(const EvalTask& t) {
  json j = {{"id", t.id}, {"line", t.line}, {"category", t.category}, {"length", t.length}};
  if (!t.meta_json.empty()) j["meta"] = json::parse(t.meta_json, nullptr, /*allow_exceptions=*/false);
  return j;
}

json RunJson(const EvalSetting& s, const BatchRunStats& run, size_t items) {
  json j = SettingJson(s);
  j["type"] = "setting";
  j["items"] = items;
  j["wall_s"] = run.wall_seconds;
  j["generated_tokens"] = run.generated_tokens;
  j["tokens_per_s"] = run.wall_seconds > 0 ? run.generated_tokens / run.wall_seconds : 0.0;
  j["sparse_steps"] = run.sparse_steps;
  j["dense_steps"] = run.dense_steps;
  j["weak_retrieval_fallback_steps"] = run.weak_retrieval_fallback_steps;
  j["weak_retrieval_fallback_sequences"] = run.weak_retrieval_fallback_sequences;
  return j;
}

// Writes the summaries and the overlap lines, and prints them.
absl::Status Report(const EvalSummary& summary, const std::string& type,
                    const std::vector<std::pair<EvalSetting, std::vector<double>>>& overlaps, JsonlWriter& out) {
  for (const json& j : summary.Json(type)) RETURN_IF_ERROR(out.Write(j));
  std::string text = summary.Table();
  for (const auto& [setting, samples] : overlaps) {
    RETURN_IF_ERROR(out.Write(OverlapJson(setting, samples)));
    text += OverlapLine(setting, samples) + "\n";
  }
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<JsonlWriter> JsonlWriter::Open(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return absl::InvalidArgumentError(absl::StrCat("--out ", path, ": ", std::strerror(errno)));
  return JsonlWriter(path, f);
}

JsonlWriter::~JsonlWriter() {
  if (f_ != nullptr) std::fclose(f_);
}

absl::Status JsonlWriter::Write(const json& line) {
  const std::string s = DumpJson(line) + "\n";
  if (std::fwrite(s.data(), 1, s.size(), f_) != s.size() || std::fflush(f_) != 0) {
    return absl::DataLossError(absl::StrCat("writing ", path_, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

json SettingJson(const EvalSetting& s) {
  return {{"setting", std::string(s.name())}, {"budget", s.dense ? json(nullptr) : json(s.budget)}};
}

absl::Status RunTaskSettings(const EvalInputs& in, BatchRunner& runner, JsonlWriter& out) {
  EvalSummary summary({{"score"}, {"full_score"}, {"prompt_tokens"}, {"generated_tokens"}});
  std::vector<std::pair<EvalSetting, std::vector<double>>> overlaps;
  for (const EvalSetting& setting : in.settings) {
    Progress progress(Label(setting), in.tasks.size());
    size_t done = 0;
    int64_t tokens = 0;
    absl::Status write;
    ASSIGN_OR_RETURN(BatchRunStats run, RunTasks(runner, in.tasks, in.prompts, setting, in.max_in_flight,
                                                 [&](TaskResult r) {
                                                   const EvalTask& t = in.tasks[r.task];
                                                   const GenerationStats& st = r.outcome.stats;
                                                   json j = TaskJson(t);
                                                   j["type"] = "result";
                                                   j.update(SettingJson(setting));
                                                   j["prompt_tokens"] = r.prompt_tokens;
                                                   j["generated_tokens"] = st.generated_tokens;
                                                   j["finish"] = std::string(FinishReasonName(r.outcome.reason));
                                                   j["score"] = r.score;
                                                   j["scoring"] = std::string(ScoringName(t.scoring));
                                                   j["answers"] = t.answers;
                                                   j["output"] = r.outcome.text;
                                                   j["ttft_ms"] = st.time_to_first_token_ms;
                                                   j["decode_ms"] = st.decode_ms;
                                                   if (write.ok()) write = out.Write(j);
                                                   const double v[] = {r.score, r.score == 1.0 ? 1.0 : 0.0,
                                                                       static_cast<double>(r.prompt_tokens),
                                                                       static_cast<double>(st.generated_tokens)};
                                                   summary.Add(t, setting, v);
                                                   tokens += st.generated_tokens;
                                                   progress.Update(++done, tokens);
                                                 }));
    RETURN_IF_ERROR(write);
    RETURN_IF_ERROR(out.Write(RunJson(setting, run, in.tasks.size())));
    if (!setting.dense) overlaps.emplace_back(setting, run.overlap);
  }
  return Report(summary, "summary", overlaps, out);
}

absl::Status RunFidelitySettings(const EvalInputs& in, int32_t max_new_tokens, bool ignore_eos, BatchRunner& runner,
                                 JsonlWriter& out) {
  std::vector<int32_t> new_tokens;
  for (const EvalTask& t : in.tasks) new_tokens.push_back(t.max_new_tokens > 0 ? t.max_new_tokens : max_new_tokens);
  FidelityRun fidelity(&runner, in.prompts, new_tokens, ignore_eos, in.max_in_flight,
                       [&](size_t i) { return TaskName(in.file, in.tasks[i]); });
  {
    Progress progress("dense reference", in.tasks.size());
    size_t done = 0;
    int64_t tokens = 0;
    ASSIGN_OR_RETURN(BatchRunStats run, fidelity.RunReferences([&](size_t i) {
                       tokens += static_cast<int64_t>(fidelity.references()[i].tokens.size());
                       progress.Update(++done, tokens);
                     }));
    for (size_t i = 0; i < in.tasks.size(); ++i) {
      const FidelityReference& ref = fidelity.references()[i];
      json j = TaskJson(in.tasks[i]);
      j["type"] = "reference";
      j["prompt_tokens"] = in.prompts[i].size();
      j["tokens"] = ref.tokens.size();
      double nll = 0;
      for (double x : ref.nll) nll += x;
      j["nll_mean"] = ref.nll.empty() ? 0.0 : nll / ref.nll.size();
      j["distinct4"] = DistinctNgramRatio(ref.tokens, 4);
      j["finish"] = std::string(FinishReasonName(ref.reason));
      j["output"] = ref.text;
      RETURN_IF_ERROR(out.Write(j));
    }
    json r = RunJson(EvalSetting{}, run, in.tasks.size());
    r["type"] = "reference_run";
    RETURN_IF_ERROR(out.Write(r));
  }
  EvalSummary summary({{"tokens_to_divergence", true},
                       {"diverged"},
                       {"nll_gap"},
                       {"nll_reference"},
                       {"nll_candidate"},
                       {"dense_argmax"},
                       {"distinct4_reference"},
                       {"distinct4_candidate"},
                       {"tokens"}});
  std::vector<std::pair<EvalSetting, std::vector<double>>> overlaps;
  for (const EvalSetting& setting : in.settings) {
    Progress progress(Label(setting), in.tasks.size());
    size_t done = 0;
    int64_t tokens = 0;
    absl::Status write;
    ASSIGN_OR_RETURN(BatchRunStats run, fidelity.Compare(setting, [&](FidelityResult r) {
                       const EvalTask& t = in.tasks[r.prompt];
                       const bool diverged = r.first_divergence >= 0;
                       // Never diverged: censored at the tokens compared.
                       const int64_t to_divergence = diverged ? r.first_divergence : r.compared_tokens;
                       json j = TaskJson(t);
                       j["type"] = "fidelity";
                       j.update(SettingJson(setting));
                       j["prompt_tokens"] = r.prompt_tokens;
                       j["reference_tokens"] = fidelity.references()[r.prompt].tokens.size();
                       j["tokens"] = r.candidate.tokens.size();
                       j["first_divergence"] = diverged ? json(r.first_divergence) : json(nullptr);
                       j["tokens_to_divergence"] = to_divergence;
                       j["nll_reference"] = r.nll_reference;
                       j["nll_candidate"] = r.nll_candidate;
                       j["nll_gap"] = r.nll_candidate - r.nll_reference;
                       j["dense_argmax"] = r.candidate_dense_argmax;
                       j["distinct4_reference"] = r.distinct4_reference;
                       j["distinct4_candidate"] = r.distinct4_candidate;
                       j["finish"] = std::string(FinishReasonName(r.candidate.reason));
                       j["output"] = r.candidate.text;
                       if (write.ok()) write = out.Write(j);
                       const double v[] = {static_cast<double>(to_divergence), diverged ? 1.0 : 0.0,
                                           r.nll_candidate - r.nll_reference, r.nll_reference, r.nll_candidate,
                                           r.candidate_dense_argmax, r.distinct4_reference, r.distinct4_candidate,
                                           static_cast<double>(r.candidate.tokens.size())};
                       summary.Add(t, setting, v);
                       tokens += static_cast<int64_t>(r.candidate.tokens.size());
                       progress.Update(++done, tokens);
                     }));
    RETURN_IF_ERROR(write);
    RETURN_IF_ERROR(out.Write(RunJson(setting, run, in.tasks.size())));
    if (!setting.dense) overlaps.emplace_back(setting, run.overlap);
  }
  return Report(summary, "fidelity_summary", overlaps, out);
}

}  // namespace specontext
