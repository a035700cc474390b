#include "core/dtype.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace specontext {

namespace {

struct DTypeInfo {
  DType dtype;
  int bits;
  std::string_view name;         // ours, lower case
  std::string_view safetensors;  // the safetensors header spelling
};

// One row per DType, in enum order.
constexpr DTypeInfo kDTypes[] = {
    {DType::kF32, 32, "f32", "F32"},          {DType::kF16, 16, "f16", "F16"},
    {DType::kBF16, 16, "bf16", "BF16"},       {DType::kI32, 32, "i32", "I32"},
    {DType::kI64, 64, "i64", "I64"},          {DType::kU8, 8, "u8", "U8"},
    {DType::kBool, 8, "bool", "BOOL"},        {DType::kI8, 8, "i8", "I8"},
    {DType::kI16, 16, "i16", "I16"},          {DType::kU16, 16, "u16", "U16"},
    {DType::kU32, 32, "u32", "U32"},          {DType::kU64, 64, "u64", "U64"},
    {DType::kF64, 64, "f64", "F64"},          {DType::kC64, 64, "c64", "C64"},
    {DType::kF8E4M3, 8, "f8_e4m3", "F8_E4M3"}, {DType::kF8E5M2, 8, "f8_e5m2", "F8_E5M2"},
    {DType::kF8E8M0, 8, "f8_e8m0", "F8_E8M0"}, {DType::kF4, 4, "f4", "F4"},
    {DType::kF6E2M3, 6, "f6_e2m3", "F6_E2M3"}, {DType::kF6E3M2, 6, "f6_e3m2", "F6_E3M2"},
};

constexpr bool TableInEnumOrder() {
  for (size_t i = 0; i < sizeof(kDTypes) / sizeof(kDTypes[0]); ++i) {
    if (static_cast<size_t>(kDTypes[i].dtype) != i) return false;
  }
  return true;
}
static_assert(TableInEnumOrder(), "kDTypes rows must follow the DType enum");

const DTypeInfo* Info(DType d) {
  const size_t i = static_cast<size_t>(d);
  return i < sizeof(kDTypes) / sizeof(kDTypes[0]) ? &kDTypes[i] : nullptr;
}

}  // namespace

int DTypeBits(DType dtype) {
  const DTypeInfo* i = Info(dtype);
  return i == nullptr ? 0 : i->bits;
}

size_t DTypeSize(DType dtype) {
  const int bits = DTypeBits(dtype);
  return bits % 8 == 0 ? static_cast<size_t>(bits / 8) : 0;
}

size_t DTypeBytes(DType dtype, uint64_t numel) {
  return static_cast<size_t>((numel * static_cast<uint64_t>(DTypeBits(dtype)) + 7) / 8);
}

std::string_view DTypeName(DType dtype) {
  const DTypeInfo* i = Info(dtype);
  return i == nullptr ? "?" : i->name;
}

std::string_view SafetensorsDTypeName(DType dtype) {
  const DTypeInfo* i = Info(dtype);
  return i == nullptr ? "?" : i->safetensors;
}

absl::StatusOr<DType> ParseSafetensorsDType(std::string_view name) {
  for (const DTypeInfo& i : kDTypes) {
    if (name == i.safetensors) return i.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported safetensors dtype \"", std::string(name), "\""));
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // overflow (incl. rounding up) -> inf
  if (abs < 0x38800000u) {                        // subnormal or zero in f16
    if (abs < 0x33000000u) return sign;           // below half the smallest subnormal
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 + (112 - e) + 1 ... maps to subnormal mantissa
    uint32_t q = m >> (shift - 0);
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

void ConvertToF32(const void* src, DType src_dtype, float* dst, size_t n) {
  switch (src_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(s[i]);
      return;
    }
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      return;
    }
    default:
      for (size_t i = 0; i < n; ++i) dst[i] = NAN;
  }
}

void ConvertFromF32(const float* src, DType dst_dtype, void* dst, size_t n) {
  switch (dst_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = F32ToBf16(src[i]);
      return;
    }
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = F32ToF16(src[i]);
      return;
    }
    default:
      return;
  }
}

}  // namespace specontext
