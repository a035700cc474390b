#include "core/eval/fidelity.h"

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

double MeanOf(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}

// log Σ exp(logits), in double.
double LogSumExp(std::span<const float> logits, float max) {
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max);
  return std::log(sum) + max;
}

}  // namespace

int64_t FirstDivergence(std::span<const int32_t> a, std::span<const int32_t> b) {
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return a.size() == b.size() ? -1 : static_cast<int64_t>(n);
}

double DistinctNgramRatio(std::span<const int32_t> tokens, int32_t n) {
  if (n < 1 || static_cast<int64_t>(tokens.size()) < n) return 1;
  absl::flat_hash_set<std::vector<int32_t>> seen;
  const size_t total = tokens.size() - n + 1;
  for (size_t i = 0; i < total; ++i) seen.emplace(tokens.begin() + i, tokens.begin() + i + n);
  return static_cast<double>(seen.size()) / static_cast<double>(total);
}

double TokenNll(std::span<const float> logits, int32_t token) {
  if (logits.empty() || token < 0 || static_cast<size_t>(token) >= logits.size()) return INFINITY;
  const float max = *std::max_element(logits.begin(), logits.end());
  return LogSumExp(logits, max) - logits[token];
}

GenerationRequest FidelityRun::Request(size_t i, const EvalSetting& setting) const {
  GenerationRequest r;
  r.prompt = prompts_[i];
  r.max_new_tokens = new_tokens_[i];
  r.ignore_eos = ignore_eos_;
  r.dense = setting.dense;
  r.budget = setting.dense ? 0 : setting.budget;
  return r;
}

absl::StatusOr<BatchRunStats> FidelityRun::RunReferences(const std::function<void(size_t)>& on_done) {
  const size_t n = prompts_.size();
  references_.assign(n, {});
  std::vector<std::vector<int32_t>> argmax(n);
  std::vector<GenerationRequest> requests;
  for (size_t i = 0; i < n; ++i) {
    GenerationRequest r = Request(i, EvalSetting{});
    // Greedy picks the first maximum (Sampler), which is what max_element finds: the NLL of the choice.
    r.logits_observer = [this, i, &argmax](int32_t, std::span<const float> logits) {
      const auto it = std::max_element(logits.begin(), logits.end());
      argmax[i].push_back(static_cast<int32_t>(it - logits.begin()));
      references_[i].nll.push_back(LogSumExp(logits, *it) - *it);
    };
    requests.push_back(std::move(r));
  }
  ASSIGN_OR_RETURN(BatchRunStats stats, runner_->Run(std::move(requests), max_in_flight_, name_,
                                                     [&](size_t i, BatchOutcome o) {
                                                       references_[i].tokens = std::move(o.tokens);
                                                       references_[i].text = std::move(o.text);
                                                       references_[i].reason = o.reason;
                                                       on_done(i);
                                                     }));
  for (size_t i = 0; i < n; ++i) {
    if (argmax[i] != references_[i].tokens) {
      return absl::InternalError(absl::StrCat(name_(i), ": the dense continuation is not the argmax of its logits"));
    }
  }
  return stats;
}

absl::StatusOr<BatchRunStats> FidelityRun::Compare(const EvalSetting& setting,
                                                   const std::function<void(FidelityResult)>& on_result) {
  const size_t n = prompts_.size();
  if (references_.size() != n) return absl::FailedPreconditionError("fidelity: run the dense references first");
  std::vector<BatchOutcome> candidates(n);
  std::vector<GenerationRequest> requests;
  for (size_t i = 0; i < n; ++i) requests.push_back(Request(i, setting));
  ASSIGN_OR_RETURN(BatchRunStats stats, runner_->Run(std::move(requests), max_in_flight_, name_,
                                                     [&](size_t i, BatchOutcome o) { candidates[i] = std::move(o); }));
  // The dense model reads each candidate continuation token by token (its own decode path).
  std::vector<std::vector<double>> nll(n);
  std::vector<int64_t> hits(n, 0);
  requests.clear();
  for (size_t i = 0; i < n; ++i) {
    GenerationRequest r = Request(i, EvalSetting{});
    r.forced_tokens = candidates[i].tokens;
    r.max_new_tokens = static_cast<int32_t>(r.forced_tokens.size());
    const std::vector<int32_t>* forced = &candidates[i].tokens;
    r.logits_observer = [i, forced, &nll, &hits](int32_t index, std::span<const float> logits) {
      const int32_t token = (*forced)[index];
      nll[i].push_back(TokenNll(logits, token));
      hits[i] += std::max_element(logits.begin(), logits.end()) - logits.begin() == token;
    };
    requests.push_back(std::move(r));
  }
  absl::Status consistent;
  RETURN_IF_ERROR(runner_->Run(std::move(requests), max_in_flight_, name_, [&](size_t i, BatchOutcome o) {
                            // The dense model must have read exactly the candidate's tokens, each once.
                            if (consistent.ok() && (o.tokens != candidates[i].tokens ||
                                                    nll[i].size() != candidates[i].tokens.size())) {
                              consistent = absl::InternalError(absl::StrCat(
                                  name_(i), ": teacher forcing read ", nll[i].size(), " of ",
                                  candidates[i].tokens.size(), " tokens"));
                            }
                            const FidelityReference& ref = references_[i];
                            FidelityResult r;
                            r.prompt = i;
                            r.prompt_tokens = static_cast<int32_t>(prompts_[i].size());
                            r.candidate = std::move(candidates[i]);
                            r.first_divergence = FirstDivergence(ref.tokens, r.candidate.tokens);
                            r.compared_tokens = static_cast<int64_t>(std::min(ref.tokens.size(), r.candidate.tokens.size()));
                            r.nll_reference = MeanOf(ref.nll);
                            r.nll_candidate = MeanOf(nll[i]);
                            r.candidate_dense_argmax =
                                nll[i].empty() ? 0 : static_cast<double>(hits[i]) / static_cast<double>(nll[i].size());
                            r.distinct4_reference = DistinctNgramRatio(ref.tokens, 4);
                            r.distinct4_candidate = DistinctNgramRatio(r.candidate.tokens, 4);
                            on_result(std::move(r));
                          }).status());
  RETURN_IF_ERROR(consistent);
  return stats;
}

}  // namespace specontext
