#include "core/rope/rope_frequencies.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "absl/strings/str_cat.h"

namespace specontext {
namespace {

// HF's _compute_yarn_parameters: dimensions below `low` extrapolate, above `high` interpolate.
void ApplyYarn(const ModelConfig& c, std::vector<double>& inv, float* attention_scaling) {
  const RopeScaling& s = c.rope_scaling;
  const double dim = static_cast<double>(c.head_dim), base = c.rope_theta, factor = s.factor;
  const double orig = static_cast<double>(s.original_max_position_embeddings > 0
                                              ? s.original_max_position_embeddings
                                              : c.max_position_embeddings);
  const double mscale = factor <= 1 ? 1.0 : 0.1 * std::log(factor) + 1.0;
  *attention_scaling = static_cast<float>(s.attention_factor > 0 ? s.attention_factor : mscale);
  auto correction_dim = [&](double rotations) {
    return dim * std::log(orig / (rotations * 2 * std::numbers::pi)) / (2 * std::log(base));
  };
  double low = std::max(0.0, std::floor(correction_dim(s.beta_fast)));
  double high = std::min(dim - 1, std::ceil(correction_dim(s.beta_slow)));
  if (low == high) high += 0.001;
  for (size_t j = 0; j < inv.size(); ++j) {
    const double ramp = std::clamp((static_cast<double>(j) - low) / (high - low), 0.0, 1.0);
    const double extrapolation_factor = 1.0 - ramp;
    const double extrapolated = inv[j], interpolated = inv[j] / factor;
    inv[j] = interpolated * (1 - extrapolation_factor) + extrapolated * extrapolation_factor;
  }
}

void ApplyLlama3(const ModelConfig& c, std::vector<double>& inv) {
  const RopeScaling& s = c.rope_scaling;
  const double orig = static_cast<double>(s.original_max_position_embeddings);
  const double low_wavelen = orig / s.low_freq_factor, high_wavelen = orig / s.high_freq_factor;
  for (double& f : inv) {
    const double wavelen = 2 * std::numbers::pi / f;
    if (wavelen > low_wavelen) {
      f = f / s.factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = (1 - smooth) * f / s.factor + smooth * f;
    }
  }
}

}  // namespace

absl::StatusOr<RopeFrequencies> ComputeRopeFrequencies(const ModelConfig& c) {
  if (c.head_dim <= 0 || c.head_dim % 2 != 0 || c.rope_theta <= 0) {
    return absl::InvalidArgumentError("rope needs an even head_dim and a positive rope_theta");
  }
  const int64_t half = c.head_dim / 2;
  std::vector<double> inv(half);
  // Computed in float32 like torch (base ** (arange(0, dim, 2).float() / dim)) so angles match HF.
  for (int64_t j = 0; j < half; ++j) {
    const float exponent = static_cast<float>(2 * j) / static_cast<float>(c.head_dim);
    inv[j] = 1.0f / std::pow(static_cast<float>(c.rope_theta), exponent);
  }
  RopeFrequencies out;
  const std::string& type = c.rope_scaling.type;
  if (type.empty() || type == "default") {
  } else if (type == "linear") {
    for (double& f : inv) f /= c.rope_scaling.factor;
  } else if (type == "llama3") {
    if (c.rope_scaling.original_max_position_embeddings <= 0 ||
        c.rope_scaling.high_freq_factor == c.rope_scaling.low_freq_factor) {
      return absl::InvalidArgumentError("llama3 rope_scaling needs original_max_position_embeddings and "
                                        "distinct low/high frequency factors");
    }
    ApplyLlama3(c, inv);
  } else if (type == "yarn") {
    ApplyYarn(c, inv, &out.attention_scaling);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unsupported rope_scaling type \"", type, "\""));
  }
  const std::vector<double>& factors = c.rope_scaling.freq_factors;
  if (!factors.empty()) {  // llama.cpp's rope_freqs: theta_j = pos * inv_freq_j / factor_j
    if (factors.size() != inv.size()) {
      return absl::InvalidArgumentError(absl::StrCat("rope frequency factors: ", factors.size(),
                                                     " given for head_dim / 2 = ", inv.size(), " frequencies"));
    }
    for (size_t j = 0; j < inv.size(); ++j) {
      if (!(factors[j] > 0) || !std::isfinite(factors[j])) {
        return absl::InvalidArgumentError(absl::StrCat("rope frequency factor ", j, " is ", factors[j]));
      }
      inv[j] /= factors[j];
    }
  }
  out.inv_freq.assign(inv.begin(), inv.end());
  return out;
}

}  // namespace specontext
