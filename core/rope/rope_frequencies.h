// Rotary inverse frequencies for every rope_scaling type the supported models use, computed as
// HF transformers does (modeling_rope_utils): default, linear, llama3 and yarn.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "core/io/model_config.h"

namespace specontext {

struct RopeFrequencies {
  std::vector<float> inv_freq;    // [head_dim / 2]
  float attention_scaling = 1.0f; // yarn's mscale; 1 otherwise
};

absl::StatusOr<RopeFrequencies> ComputeRopeFrequencies(const ModelConfig& config);

}  // namespace specontext
