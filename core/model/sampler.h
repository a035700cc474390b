// Token sampling from logits: greedy, temperature, top-k, top-p, seeded.
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "absl/status/status.h"

namespace specontext {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // in (0, 1]
  uint64_t seed = 0;
};

// Rejects NaN/negative temperature, top_p outside (0, 1], negative top_k.
absl::Status ValidateSamplingParams(const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  // Picks a token from logits [vocab] (f32). Greedy ties resolve to the lowest id.
  int32_t Sample(std::span<const float> logits);
  // Whether Sample is an argmax (temperature 0 or top_k 1): it then draws nothing from the generator.
  bool greedy() const { return params_.temperature == 0.0f || params_.top_k == 1; }
  const SamplingParams& params() const { return params_; }
  // The next draw in [0, 1) from the request's generator: the very value Sample would scale by the kept
  // mass, so a device sampler given it (Backend::SampleTokens) follows the same seeded stream.
  float NextUniform();

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace specontext
