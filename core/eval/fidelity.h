// Long-generation fidelity: how far a sparse greedy continuation follows the dense one, and how much the dense
// model dislikes what the sparse run wrote instead. Per prompt and setting:
//   - tokens until the first divergence from the dense continuation;
//   - the dense model's mean per-token NLL of the candidate continuation (teacher-forced through the dense
//     setting of the same engine, GenerationRequest::forced_tokens + logits_observer) against that of its own
//     greedy continuation, and how often the forced token is the dense argmax;
//   - the distinct-4-gram ratio of both continuations (sparse KV is known to fall into repetition loops).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/eval/batch_runner.h"
#include "core/eval/task_eval.h"

namespace specontext {

/// The index of the first position where `a` and `b` differ, comparing min(|a|, |b|) tokens; when one is a
/// prefix of the other but they differ in length, that common length; -1 when they are equal.
int64_t FirstDivergence(std::span<const int32_t> a, std::span<const int32_t> b);
/// Distinct n-grams / n-grams of `tokens` (1 when there are fewer than n tokens).
double DistinctNgramRatio(std::span<const int32_t> tokens, int32_t n);
/// -log softmax(logits)[token], in double.
double TokenNll(std::span<const float> logits, int32_t token);

/// The dense model's own greedy continuation of one prompt.
struct FidelityReference {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<double> nll;  // per token: the dense model's NLL of its own choice
  FinishReason reason = FinishReason::kNone;
};

struct FidelityResult {
  size_t prompt = 0;
  int32_t prompt_tokens = 0;
  BatchOutcome candidate;            // the continuation under the setting
  int64_t first_divergence = -1;     // FirstDivergence(reference, candidate); -1 = never
  int64_t compared_tokens = 0;       // min(|reference|, |candidate|)
  double nll_reference = 0;          // mean NLL of the reference under the dense model
  double nll_candidate = 0;          // mean NLL of the candidate under the dense model (teacher-forced)
  double candidate_dense_argmax = 0; // fraction of candidate tokens that are the dense model's argmax
  double distinct4_reference = 0;
  double distinct4_candidate = 0;
};

class FidelityRun {
 public:
  /// `prompts`: token ids per prompt; `new_tokens`: max_new_tokens per prompt; `ignore_eos`: generate the
  /// full length even past end-of-sequence tokens. All must outlive the run.
  FidelityRun(BatchRunner* runner, std::span<const std::vector<int32_t>> prompts, std::span<const int32_t> new_tokens,
              bool ignore_eos, int32_t max_in_flight, std::function<std::string(size_t)> name)
      : runner_(runner), prompts_(prompts), new_tokens_(new_tokens), ignore_eos_(ignore_eos),
        max_in_flight_(max_in_flight), name_(std::move(name)) {}

  /// Generates the dense references (once, before any Compare). `on_done(i)` as each finishes.
  absl::StatusOr<BatchRunStats> RunReferences(const std::function<void(size_t)>& on_done);
  const std::vector<FidelityReference>& references() const { return references_; }

  /// Generates every prompt under `setting`, then teacher-forces the continuations through the dense
  /// setting; `on_result` as each prompt's comparison completes. Returns the generation run's stats (the
  /// forced scoring is not part of them).
  absl::StatusOr<BatchRunStats> Compare(const EvalSetting& setting, const std::function<void(FidelityResult)>& on_result);

 private:
  GenerationRequest Request(size_t i, const EvalSetting& setting) const;

  BatchRunner* runner_;
  std::span<const std::vector<int32_t>> prompts_;
  std::span<const int32_t> new_tokens_;
  bool ignore_eos_;
  int32_t max_in_flight_;
  std::function<std::string(size_t)> name_;
  std::vector<FidelityReference> references_;
};

}  // namespace specontext
