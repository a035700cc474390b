// Element types and conversions between them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace specontext {

// Every element type a checkpoint can hold (the safetensors list: huggingface/safetensors
// safetensors/src/tensor.rs `Dtype`, plus torch's storages). The engine computes with kF32, kF16 and kBF16
// (IsFloating) and indexes with kI32/kI64; the others are read and carried (t2d masks are kBool, d2t maps
// kI64, quantised checkpoints F8/F4 scales) so that one such tensor does not make a whole file unreadable.
// A tensor the engine has to use in a dtype it cannot compute with is refused where it is used, naming the
// tensor and the dtype.
enum class DType : uint8_t {
  kF32, kF16, kBF16, kI32, kI64, kU8,  // the original six keep their values
  kBool, kI8, kI16, kU16, kU32, kU64, kF64, kC64,
  kF8E4M3, kF8E5M2, kF8E8M0,
  kF4, kF6E2M3, kF6E3M2,  // sub-byte (packed) float formats
};

/// Bits of one element: 4 (F4), 6 (F6_*), 8 ... 64.
int DTypeBits(DType dtype);
/// Bytes of one element; 0 for the sub-byte formats (use DTypeBytes for a count of them).
size_t DTypeSize(DType dtype);
/// Bytes of `numel` packed elements, rounded up to a whole byte.
size_t DTypeBytes(DType dtype, uint64_t numel);
std::string_view DTypeName(DType dtype);

// Parses a safetensors dtype string ("F32", "BF16", "BOOL", "F8_E4M3", ...). Unknown strings are an error.
absl::StatusOr<DType> ParseSafetensorsDType(std::string_view name);
// The safetensors spelling of `dtype`.
std::string_view SafetensorsDTypeName(DType dtype);

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float F16ToF32(uint16_t v);
uint16_t F32ToF16(float f);

// Converts n elements of a floating dtype (F32, F16, BF16) to f32.
void ConvertToF32(const void* src, DType src_dtype, float* dst, size_t n);
// Converts n f32 values to a floating dtype (F32, F16, BF16).
void ConvertFromF32(const float* src, DType dst_dtype, void* dst, size_t n);

inline bool IsFloating(DType d) { return d == DType::kF32 || d == DType::kF16 || d == DType::kBF16; }

}  // namespace specontext
