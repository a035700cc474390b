// The ggml dequantizers against reference vectors from the gguf Python package
// (tools/reference/make_gguf_quant_vectors.py): every element bit-identical.
#include "core/io/ggml_dequantize.h"

#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

using ::testing::HasSubstr;

class DequantizeVectors : public ::testing::TestWithParam<GgmlType> {};

TEST_P(DequantizeVectors, BitExactAgainstGgufPy) {
  const GgmlType type = GetParam();
  const std::string base = std::string(SPECONTEXT_TEST_DATA "/gguf/quants/") + GgmlTypeName(type);
  const std::string blocks = testing::ReadFile(base + ".blocks");
  const std::string expected = testing::ReadFile(base + ".f32");
  ASSERT_FALSE(blocks.empty()) << base << ": run tools/reference/make_gguf_quant_vectors.py";
  ASSERT_EQ(expected.size() % 4, 0u);
  const int64_t n = static_cast<int64_t>(expected.size() / 4);
  // Dequantize from an odd address: the block data of a GGUF file need not be aligned.
  std::string shifted = " " + blocks;
  std::vector<float> got(n + 1, -12345.0f);  // one sentinel past the end
  ASSERT_TRUE(DequantizeGgml(type, reinterpret_cast<const uint8_t*>(shifted.data() + 1),
                             blocks.size(), n, got.data())
                  .ok());
  EXPECT_EQ(got[n], -12345.0f) << "wrote past the end";
  int mismatches = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t want, have;
    std::memcpy(&want, expected.data() + 4 * k, 4);
    std::memcpy(&have, &got[k], 4);
    if (want != have && ++mismatches <= 5) {
      float w;
      std::memcpy(&w, &want, 4);
      ADD_FAILURE() << GgmlTypeName(type) << " element " << k << ": got " << got[k] << " want "
                    << w;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, DequantizeVectors,
                         ::testing::Values(GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16,
                                           GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0,
                                           GgmlType::kQ5_1, GgmlType::kQ8_0, GgmlType::kQ2_K,
                                           GgmlType::kQ3_K, GgmlType::kQ4_K, GgmlType::kQ5_K,
                                           GgmlType::kQ6_K),
                         [](const auto& info) { return GgmlTypeName(info.param); });

TEST(Dequantize, RefusesUnsupportedTypesByName) {
  std::vector<uint8_t> block(66, 0);
  float out[256];
  absl::Status s = DequantizeGgml(GgmlType::kIQ2_XXS, block.data(), block.size(), 256, out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("IQ2_XXS"));
  EXPECT_FALSE(CanDequantizeGgml(GgmlType::kIQ4_XS));
  EXPECT_FALSE(CanDequantizeGgml(GgmlType::kQ8_K));
  EXPECT_TRUE(CanDequantizeGgml(GgmlType::kQ6_K));
  EXPECT_THAT(DequantizeGgml(static_cast<GgmlType>(31), block.data(), 0, 0, out).message(),
              HasSubstr("type 31"));
}

TEST(Dequantize, RefusesPartialBlocksAndWrongSizes) {
  std::vector<uint8_t> src(34 * 2, 0);
  std::vector<float> out(64);
  EXPECT_FALSE(
      DequantizeGgml(GgmlType::kQ8_0, src.data(), src.size(), 48, out.data()).ok());  // 1.5 blocks
  EXPECT_FALSE(DequantizeGgml(GgmlType::kQ8_0, src.data(), src.size() - 1, 64, out.data()).ok());
  EXPECT_FALSE(DequantizeGgml(GgmlType::kQ8_0, src.data(), src.size(), 32, out.data()).ok());
  EXPECT_TRUE(DequantizeGgml(GgmlType::kQ8_0, src.data(), src.size(), 64, out.data()).ok());
}

}  // namespace
}  // namespace specontext
