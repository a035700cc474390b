#include "core/rope/rope_frequencies.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

namespace specontext {
namespace {

ModelConfig Llama31() {
  ModelConfig c;
  c.head_dim = 128;
  c.rope_theta = 500000;
  c.max_position_embeddings = 131072;
  c.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 8192};
  return c;
}

TEST(RopeFrequencies, DefaultIsGeometric) {
  ModelConfig c = Llama31();
  c.rope_scaling = {};
  auto f = ComputeRopeFrequencies(c).value();
  ASSERT_EQ(f.inv_freq.size(), 64u);
  for (int j = 0; j < 64; ++j) EXPECT_NEAR(f.inv_freq[j], std::pow(500000.0, -2.0 * j / 128), 1e-6 * f.inv_freq[j] + 1e-12);
  EXPECT_EQ(f.attention_scaling, 1.0f);
}

TEST(RopeFrequencies, Llama3KeepsHighAndScalesLowFrequencies) {
  ModelConfig c = Llama31();
  auto scaled = ComputeRopeFrequencies(c).value();
  c.rope_scaling = {};
  auto base = ComputeRopeFrequencies(c).value();
  int unchanged = 0, divided = 0, smoothed = 0;
  for (int j = 0; j < 64; ++j) {
    const double wavelen = 2 * std::numbers::pi / base.inv_freq[j];
    if (wavelen < 8192 / 4.0) {
      EXPECT_FLOAT_EQ(scaled.inv_freq[j], base.inv_freq[j]);
      ++unchanged;
    } else if (wavelen > 8192 / 1.0) {
      EXPECT_FLOAT_EQ(scaled.inv_freq[j], base.inv_freq[j] / 8);
      ++divided;
    } else {
      EXPECT_LT(scaled.inv_freq[j], base.inv_freq[j]);
      EXPECT_GT(scaled.inv_freq[j], base.inv_freq[j] / 8);
      ++smoothed;
    }
  }
  EXPECT_GT(unchanged, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(smoothed, 0);
}

TEST(RopeFrequencies, YarnScalesAttentionAndInterpolatesLowFrequencies) {
  ModelConfig c;
  c.head_dim = 128;
  c.rope_theta = 1000000;
  c.max_position_embeddings = 131072;
  c.rope_scaling.type = "yarn";
  c.rope_scaling.factor = 4;
  c.rope_scaling.original_max_position_embeddings = 32768;
  auto f = ComputeRopeFrequencies(c).value();
  EXPECT_NEAR(f.attention_scaling, 0.1 * std::log(4.0) + 1, 1e-6);
  c.rope_scaling = {};
  auto base = ComputeRopeFrequencies(c).value();
  EXPECT_FLOAT_EQ(f.inv_freq[0], base.inv_freq[0]);
  EXPECT_NEAR(f.inv_freq[63], base.inv_freq[63] / 4, 1e-6 * base.inv_freq[63]);
}

// llama.cpp's converter writes Llama 3.1's scaling as per-frequency divisors (rope_freqs); with them and
// no scaling type the frequencies equal those of the llama3 type (up to the factors' f32 rounding).
TEST(RopeFrequencies, FreqFactorsReproduceLlama3) {
  ModelConfig c = Llama31();
  const auto llama3 = ComputeRopeFrequencies(c).value();
  c.rope_scaling = {};
  const auto base = ComputeRopeFrequencies(c).value();
  const double factor = 8, low = 1, high = 4, old_ctx = 8192;
  for (float f : base.inv_freq) {  // the converter's formula (convert_hf_to_gguf.py, LlamaModel)
    const double wavelen = 2 * std::numbers::pi / f;
    double r = 1;
    if (wavelen > old_ctx / low) {
      r = factor;
    } else if (wavelen >= old_ctx / high) {
      const double smooth = (old_ctx / wavelen - low) / (high - low);
      r = 1 / ((1 - smooth) / factor + smooth);
    }
    c.rope_scaling.freq_factors.push_back(static_cast<float>(r));  // stored as an f32 tensor
  }
  const auto from_factors = ComputeRopeFrequencies(c).value();
  for (int j = 0; j < 64; ++j) EXPECT_NEAR(from_factors.inv_freq[j], llama3.inv_freq[j], 2e-7 * llama3.inv_freq[j]);
  // Factors apply on top of a scaling type, and a list of the wrong size or a zero factor is refused.
  c.rope_scaling.type = "linear";
  c.rope_scaling.factor = 2;
  EXPECT_FLOAT_EQ(ComputeRopeFrequencies(c).value().inv_freq[63], from_factors.inv_freq[63] / 2);
  c.rope_scaling.freq_factors.pop_back();
  EXPECT_FALSE(ComputeRopeFrequencies(c).ok());
  c.rope_scaling.freq_factors.push_back(0);
  EXPECT_FALSE(ComputeRopeFrequencies(c).ok());
}

TEST(RopeFrequencies, RejectsBadConfigs) {
  ModelConfig c = Llama31();
  c.rope_scaling.type = "dynamic-foo";
  EXPECT_FALSE(ComputeRopeFrequencies(c).ok());
  c = Llama31();
  c.head_dim = 7;
  EXPECT_FALSE(ComputeRopeFrequencies(c).ok());
  c = Llama31();
  c.rope_scaling.original_max_position_embeddings = 0;
  EXPECT_FALSE(ComputeRopeFrequencies(c).ok());
}

}  // namespace
}  // namespace specontext
