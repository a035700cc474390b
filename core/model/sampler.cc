#include "core/model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"

namespace specontext {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0) {
    return absl::InvalidArgumentError(absl::StrCat("temperature must be a finite number >= 0, got ", p.temperature));
  }
  if (!std::isfinite(p.top_p) || p.top_p <= 0 || p.top_p > 1) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  if (p.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  return absl::OkStatus();
}

float Sampler::NextUniform() {
  // uniform_real_distribution(0, sum) is sum times this same canonical draw (one generator call).
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  return std::min(static_cast<float>(u), std::nextafter(1.0f, 0.0f));
}

int32_t Sampler::Sample(std::span<const float> logits) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  if (params_.temperature == 0.0f || params_.top_k == 1) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  const float inv_t = 1.0f / params_.temperature;
  const float mx = *std::max_element(logits.begin(), logits.end()) * inv_t;
  if (params_.top_k == 0 && params_.top_p >= 1.0f) {
    // Plain temperature sampling: one pass, no ordering needed.
    double sum = 0;
    for (float l : logits) sum += std::exp(static_cast<double>(l * inv_t - mx));
    std::uniform_real_distribution<double> u(0.0, sum);
    double r = u(rng_);
    for (int32_t i = 0; i < vocab; ++i) {
      r -= std::exp(static_cast<double>(logits[i] * inv_t - mx));
      if (r <= 0) return i;
    }
    return vocab - 1;
  }
  // Candidates by logit (descending, ties to the lower id), cut by top-k, then by cumulative top-p.
  // Only the head of the order is needed: sort a prefix and widen it while it holds too little mass.
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::vector<int32_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  double total = 0;
  for (float l : logits) total += std::exp(static_cast<double>(l * inv_t - mx));
  const int32_t k_limit = params_.top_k > 0 ? std::min(params_.top_k, vocab) : vocab;
  const bool top_p_of_all = params_.top_k == 0 && params_.top_p < 1.0f;
  int32_t sorted = top_p_of_all ? std::min<int32_t>(k_limit, 1024) : k_limit;
  std::vector<double> probs;
  size_t keep = 0;
  for (;;) {
    std::partial_sort(idx.begin(), idx.begin() + sorted, idx.end(), by_logit);
    probs.resize(sorted);
    double cum = 0;
    keep = sorted;
    bool covered = false;
    for (int32_t i = 0; i < sorted; ++i) {
      probs[i] = std::exp(static_cast<double>(logits[idx[i]] * inv_t - mx));
      cum += probs[i];
      if (top_p_of_all && cum / total >= params_.top_p) {
        keep = i + 1;
        covered = true;
        break;
      }
    }
    if (covered || sorted == k_limit) break;
    sorted = std::min(k_limit, sorted * 8);
  }
  if (params_.top_k > 0 && params_.top_p < 1.0f) {
    // top_p applies to the distribution renormalised over the top-k candidates.
    double k_sum = 0;
    for (int32_t i = 0; i < static_cast<int32_t>(probs.size()) && i < k_limit; ++i) k_sum += probs[i];
    double cum = 0;
    keep = probs.size();
    for (size_t i = 0; i < probs.size(); ++i) {
      cum += probs[i];
      if (cum / k_sum >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  // The draw walks the kept tokens in id order, as the plain-temperature path above and the GPU sampler
  // (Backend::SampleTokens) do: the same draw then picks the same token on every backend.
  std::vector<std::pair<int32_t, double>> kept(keep);
  double kept_sum = 0;
  for (size_t i = 0; i < keep; ++i) {
    kept[i] = {idx[i], probs[i]};
    kept_sum += probs[i];
  }
  std::sort(kept.begin(), kept.end());
  std::uniform_real_distribution<double> u(0.0, kept_sum);
  double r = u(rng_);
  for (size_t i = 0; i < keep; ++i) {
    r -= kept[i].second;
    if (r <= 0) return kept[i].first;
  }
  return kept[keep - 1].first;
}

}  // namespace specontext
