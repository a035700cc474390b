// bf16/f16 conversions of core/dtype.h, exhaustively against the compiler's _Float16 and a manual
// round-to-nearest-even reference.
#include <cmath>
#include <cstring>
#include <random>

#include "core/dtype.h"
#include "gtest/gtest.h"

namespace specontext {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t HalfBits(_Float16 h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
_Float16 HalfFromBits(uint16_t u) {
  _Float16 h;
  std::memcpy(&h, &u, 2);
  return h;
}

// Same value, or both NaN (NaN payloads are not compared).
bool SameF32(float a, float b) { return (std::isnan(a) && std::isnan(b)) || Bits(a) == Bits(b); }
bool SameF16(uint16_t a, uint16_t b) {
  const bool na = (a & 0x7c00) == 0x7c00 && (a & 0x3ff), nb = (b & 0x7c00) == 0x7c00 && (b & 0x3ff);
  return (na && nb) || a == b;
}

TEST(DtypeTest, F16ToF32AllPatterns) {
  for (uint32_t p = 0; p < 65536; ++p) {
    const float ref = static_cast<float>(HalfFromBits(static_cast<uint16_t>(p)));
    ASSERT_TRUE(SameF32(F16ToF32(static_cast<uint16_t>(p)), ref)) << std::hex << p;
  }
}

TEST(DtypeTest, F16RoundTripAllPatterns) {
  for (uint32_t p = 0; p < 65536; ++p) {
    const uint16_t h = static_cast<uint16_t>(p);
    ASSERT_TRUE(SameF16(F32ToF16(F16ToF32(h)), h)) << std::hex << p;
  }
}

TEST(DtypeTest, F32ToF16MatchesCompiler) {
  std::mt19937 rng(std::random_device{}());
  auto check = [](float f) {
    const uint16_t ref = HalfBits(static_cast<_Float16>(f));
    ASSERT_TRUE(SameF16(F32ToF16(f), ref)) << std::hexfloat << f << " bits " << std::hex << Bits(f);
  };
  // Random bit patterns cover every exponent (overflow, subnormal, NaN) ...
  for (int i = 0; i < 2000000; ++i) check(FromBits(rng()));
  // ... values in the f16 range are denser here, plus every halfway point between adjacent f16 values.
  std::uniform_real_distribution<float> u(-70000.f, 70000.f);
  for (int i = 0; i < 500000; ++i) check(u(rng));
  for (uint32_t p = 0; p < 0x7c00; ++p) {
    const float lo = F16ToF32(static_cast<uint16_t>(p)), hi = F16ToF32(static_cast<uint16_t>(p + 1));
    const float mid = static_cast<float>((static_cast<double>(lo) + hi) / 2);
    check(mid);
    check(-mid);
    check(std::nextafter(mid, 0.f));
    check(std::nextafter(mid, 1e9f));
  }
}

// Manual reference: exact rounding to 8 significant bits, ties to even, computed from the f32 bits.
uint16_t RefBf16(float f) {
  const uint32_t u = Bits(f);
  if (std::isnan(f)) return 0x7fc0;
  const uint32_t upper = u >> 16, lower = u & 0xffff;
  uint32_t r = upper;
  if (lower > 0x8000 || (lower == 0x8000 && (upper & 1))) ++r;
  return static_cast<uint16_t>(r);
}

TEST(DtypeTest, Bf16ConversionsExhaustiveAndRandom) {
  for (uint32_t p = 0; p < 65536; ++p) {
    const float f = Bf16ToF32(static_cast<uint16_t>(p));
    ASSERT_EQ(Bits(f), p << 16);
    if (!std::isnan(f)) ASSERT_EQ(F32ToBf16(f), p) << std::hex << p;
  }
  std::mt19937 rng(std::random_device{}());
  for (int i = 0; i < 4000000; ++i) {
    const float f = FromBits(rng());
    const uint16_t got = F32ToBf16(f);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(Bf16ToF32(got))) << std::hex << Bits(f);
    } else {
      ASSERT_EQ(got, RefBf16(f)) << std::hex << Bits(f);
    }
  }
}

TEST(DtypeTest, BulkConversionsAgreeWithScalar) {
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd(0.f, 100.f);
  std::vector<float> src(1037), back(1037);
  for (float& x : src) x = nd(rng);
  for (DType d : {DType::kF16, DType::kBF16, DType::kF32}) {
    std::vector<uint8_t> buf(src.size() * DTypeSize(d));
    ConvertFromF32(src.data(), d, buf.data(), src.size());
    ConvertToF32(buf.data(), d, back.data(), src.size());
    for (size_t i = 0; i < src.size(); ++i) {
      const float want = d == DType::kF16 ? F16ToF32(F32ToF16(src[i]))
                         : d == DType::kBF16 ? Bf16ToF32(F32ToBf16(src[i])) : src[i];
      ASSERT_TRUE(SameF32(back[i], want)) << DTypeName(d) << " " << i;
    }
  }
}

TEST(DtypeTest, WidthsNamesAndPackedBytes) {
  EXPECT_EQ(DTypeSize(DType::kBool), 1u);
  EXPECT_EQ(DTypeSize(DType::kU64), 8u);
  EXPECT_EQ(DTypeSize(DType::kC64), 8u);
  EXPECT_EQ(DTypeSize(DType::kF4), 0u) << "packed formats have no whole-byte element";
  EXPECT_EQ(DTypeBytes(DType::kF4, 6), 3u);
  EXPECT_EQ(DTypeBytes(DType::kF6E3M2, 4), 3u);
  EXPECT_EQ(DTypeBytes(DType::kBF16, 5), 10u);
  EXPECT_EQ(DTypeName(DType::kF8E4M3), "f8_e4m3");
  for (const char* name : {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32",
                           "F64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}) {
    absl::StatusOr<DType> d = ParseSafetensorsDType(name);
    ASSERT_TRUE(d.ok()) << name;
    EXPECT_EQ(SafetensorsDTypeName(*d), name);
  }
  EXPECT_FALSE(ParseSafetensorsDType("f32").ok()) << "the header spelling is upper case";
  EXPECT_FALSE(IsFloating(DType::kF64)) << "the engine computes in f32/f16/bf16 only";
  EXPECT_FALSE(IsFloating(DType::kBool));
}

}  // namespace
}  // namespace specontext
