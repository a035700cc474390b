#include "core/model/rope_frequencies.h"

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
