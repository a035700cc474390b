// A small GGUF writer for tests: metadata of every type, tensors of any ggml type from raw block
// bytes, and knobs to write malformed files (wrong version, lying counts, explicit offsets).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/io/ggml_types.h"
#include "core/io/gguf.h"

namespace specontext::testing {

// Little-endian encoders of GGUF values (gguf.md).
inline void PutLE(std::string& out, uint64_t v, int n) {
  for (int k = 0; k < n; ++k) out.push_back(static_cast<char>((v >> (8 * k)) & 0xff));
}
inline std::string GgufStr(const std::string& s) {
  std::string out;
  PutLE(out, s.size(), 8);
  return out + s;
}
inline std::string GgufF32Bytes(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  std::string out;
  PutLE(out, b, 4);
  return out;
}
inline std::string GgufF64Bytes(double f) {
  uint64_t b;
  std::memcpy(&b, &f, 8);
  std::string out;
  PutLE(out, b, 8);
  return out;
}
// An array value's payload: element type, count, then the elements' encodings.
inline std::string GgufArray(GgufType elem, uint64_t count, const std::string& elements) {
  std::string out;
  PutLE(out, static_cast<uint32_t>(elem), 4);
  PutLE(out, count, 8);
  return out + elements;
}

class GgufWriter {
 public:
  // Metadata; `payload` is the value's encoding without its type.
  GgufWriter& Raw(const std::string& key, GgufType type, const std::string& payload) {
    kv_ += GgufStr(key);
    PutLE(kv_, static_cast<uint32_t>(type), 4);
    kv_ += payload;
    ++n_kv_;
    return *this;
  }
  GgufWriter& U32(const std::string& key, uint32_t v) { return Int(key, GgufType::kU32, v, 4); }
  GgufWriter& I32(const std::string& key, int32_t v) {
    return Int(key, GgufType::kI32, static_cast<uint32_t>(v), 4);
  }
  GgufWriter& U64(const std::string& key, uint64_t v) { return Int(key, GgufType::kU64, v, 8); }
  GgufWriter& Int(const std::string& key, GgufType type, uint64_t v, int n) {
    std::string p;
    PutLE(p, v, n);
    return Raw(key, type, p);
  }
  GgufWriter& F32(const std::string& key, float v) {
    return Raw(key, GgufType::kF32, GgufF32Bytes(v));
  }
  GgufWriter& F64(const std::string& key, double v) {
    return Raw(key, GgufType::kF64, GgufF64Bytes(v));
  }
  GgufWriter& Bool(const std::string& key, bool v) {
    return Raw(key, GgufType::kBool, std::string(1, v ? 1 : 0));
  }
  GgufWriter& Str(const std::string& key, const std::string& v) {
    return Raw(key, GgufType::kString, GgufStr(v));
  }
  GgufWriter& Strings(const std::string& key, const std::vector<std::string>& v) {
    std::string e;
    for (const std::string& s : v) e += GgufStr(s);
    return Raw(key, GgufType::kArray, GgufArray(GgufType::kString, v.size(), e));
  }
  GgufWriter& I32s(const std::string& key, const std::vector<int32_t>& v) {
    std::string e;
    for (int32_t x : v) PutLE(e, static_cast<uint32_t>(x), 4);
    return Raw(key, GgufType::kArray, GgufArray(GgufType::kI32, v.size(), e));
  }
  GgufWriter& F32s(const std::string& key, const std::vector<float>& v) {
    std::string e;
    for (float x : v) e += GgufF32Bytes(x);
    return Raw(key, GgufType::kArray, GgufArray(GgufType::kF32, v.size(), e));
  }

  // A tensor of `type` with ggml dims `ne` (ne[0] innermost) and its raw block bytes.
  GgufWriter& Tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                     std::string bytes) {
    tensors_.push_back({name, type, std::move(ne), std::move(bytes), std::nullopt});
    return *this;
  }
  // An f32/f16/bf16 tensor from f32 values (rounded to the type).
  GgufWriter& FloatTensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                          const std::vector<float>& values) {
    const DType dt = type == GgmlType::kF16    ? DType::kF16
                     : type == GgmlType::kBF16 ? DType::kBF16
                                               : DType::kF32;
    std::string bytes(values.size() * DTypeSize(dt), '\0');
    ConvertFromF32(values.data(), dt, bytes.data(), values.size());
    return Tensor(name, type, std::move(ne), std::move(bytes));
  }
  // Overrides the offset written for the last tensor (malformed files).
  GgufWriter& WithOffset(uint64_t offset) {
    tensors_.back().offset = offset;
    return *this;
  }

  // Knobs for malformed headers.
  uint32_t version = 3;
  uint32_t alignment =
      kGgufDefaultAlignment;     // layout only; add general.alignment yourself to change it
  int64_t claimed_tensors = -1;  // header's tensor count (-1: the real one)
  int64_t claimed_kv = -1;       // header's key/value count (-1: the real one)

  std::string Build() const {
    std::string out = "GGUF";
    PutLE(out, version, 4);
    PutLE(out, claimed_tensors >= 0 ? claimed_tensors : tensors_.size(), 8);
    PutLE(out, claimed_kv >= 0 ? claimed_kv : n_kv_, 8);
    out += kv_;
    std::string data;
    for (const Entry& t : tensors_) {
      while (data.size() % alignment != 0) data.push_back('\0');
      out += GgufStr(t.name);
      PutLE(out, t.ne.size(), 4);
      for (int64_t d : t.ne) PutLE(out, static_cast<uint64_t>(d), 8);
      PutLE(out, static_cast<uint32_t>(t.type), 4);
      PutLE(out, t.offset.value_or(data.size()), 8);
      data += t.bytes;
    }
    // Pad to the data section only when there is data: zero padding would parse as extra empty
    // key/values in the lying-count tests.
    if (!tensors_.empty()) {
      while (out.size() % alignment != 0) out.push_back('\0');
    }
    return out + data;
  }

 private:
  struct Entry {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    std::string bytes;
    std::optional<uint64_t> offset;  // nullopt: where the data lands
  };
  std::string kv_;
  uint64_t n_kv_ = 0;
  std::vector<Entry> tensors_;
};

// Byte offsets of the f16 scale fields in one block of a block-quantized type (ggml's block_*
// structs).
inline std::vector<int> GgmlScaleOffsets(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0:
    case GgmlType::kQ5_0:
    case GgmlType::kQ8_0:
      return {0};
    case GgmlType::kQ4_1:
    case GgmlType::kQ5_1:
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
      return {0, 2};
    case GgmlType::kQ2_K:
      return {80, 82};
    case GgmlType::kQ3_K:
      return {108};
    case GgmlType::kQ6_K:
      return {208};
    default:
      return {};
  }
}

// `n_blocks` random blocks of a block-quantized type whose f16 scale fields hold small values of
// either sign (|scale| ~ `scale`), so the dequantized weights are finite and of a sane size.
inline std::string RandomQuantBlocks(GgmlType type, int64_t n_blocks, std::mt19937_64& rng,
                                     float scale = 0.002f) {
  const GgmlTypeTraits t = *GgmlTypeTraitsOf(type);
  std::string out(static_cast<size_t>(n_blocks) * t.type_size, '\0');
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.0f, scale);
  for (char& c : out) c = static_cast<char>(byte(rng));
  for (int64_t b = 0; b < n_blocks; ++b) {
    for (int off : GgmlScaleOffsets(type)) {
      const uint16_t h = F32ToF16(normal(rng));
      out[b * t.type_size + off] = static_cast<char>(h & 0xff);
      out[b * t.type_size + off + 1] = static_cast<char>(h >> 8);
    }
  }
  return out;
}

}  // namespace specontext::testing
