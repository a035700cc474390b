// GGUF reading: the metadata key/values and tensor infos of a GGUF v2/v3 file (llama.cpp's format),
// parsed from a buffer (usually a read-only memory map) that stays alive while the result is used.
//
// Layout (ggml docs/gguf.md; the gguf Python package's gguf_reader.py), all little-endian:
//   "GGUF" magic, u32 version, u64 tensor_count, u64 kv_count;
//   kv_count x {string key, u32 value type, value}   (string = u64 length + bytes, no terminator;
//                                                     array = u32 element type, u64 count,
//                                                     elements; bool = 1 byte)
//   tensor_count x {string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset}
//   padding to general.alignment (u32, default 32), then the data section; each tensor's offset is
//   relative to the data section and a multiple of the alignment.
// ne[0] is the innermost (contiguous) dimension: a row-major [rows, cols] matrix has ne = {cols,
// rows}.
//
// The parser treats the buffer as untrusted: every count and length is checked against the bytes
// left before anything is allocated, so a file can only make it allocate a small multiple of its
// size.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "core/io/ggml_types.h"

namespace specontext {

enum class GgufType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

/// "u32", "string", ...; "type 13" for an unknown id.
std::string GgufTypeName(GgufType type);
/// Whether `type` is one of the 8 integer types (not bool).
bool GgufIsInteger(GgufType type);
/// Bytes of one element of a fixed-size type (scalars and bool), 0 for string, array and unknown
/// types.
size_t GgufScalarSize(GgufType type);

inline constexpr uint32_t kGgufDefaultAlignment = 32;
inline constexpr size_t kGgufMaxArrayDepth = 16;       // arrays of arrays nest at most this deep
inline constexpr size_t kGgufMaxTensorNameBytes = 64;  // gguf.md: tensor names are at most 64 bytes
inline constexpr size_t kGgufMaxKeyBytes = 65535;      // gguf.md: keys are at most 2^16 - 1 bytes

/// One metadata value. Strings and the elements of scalar arrays are views into the parsed buffer.
struct GgufValue {
  GgufType type = GgufType::kU8;
  // Scalars, decoded: unsigned types in `u`, signed types and bool in `i`, f32/f64 in `f`.
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0;
  std::string_view str;  // kString
  // kArray: `count` elements of `elem_type`. Scalar elements stay packed little-endian in `raw`
  // (count x GgufScalarSize bytes, unaligned); strings are in `strings`, nested arrays in `items`.
  GgufType elem_type = GgufType::kU8;
  uint64_t count = 0;
  std::string_view raw;
  std::vector<std::string_view> strings;
  std::vector<GgufValue> items;

  bool is_integer() const { return GgufIsInteger(type); }
  bool is_float() const { return type == GgufType::kF32 || type == GgufType::kF64; }
  /// Integer value (any integer type; nullopt for other types or a u64 above INT64_MAX).
  std::optional<int64_t> AsInt() const;
  /// Number value: f32/f64, or an integer type converted.
  std::optional<double> AsDouble() const;
  /// Element `k` of a scalar array, decoded as a scalar value (type = elem_type). k < count.
  GgufValue Element(uint64_t k) const;
};

struct GgufKeyValue {
  std::string key;
  GgufValue value;
};

/// One tensor info. `ne` has n_dims entries used, the rest 1.
struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::kF32;
  uint32_t n_dims = 0;
  std::array<int64_t, 4> ne = {1, 1, 1, 1};
  uint64_t offset = 0;  // from the start of the data section; a multiple of the alignment
  uint64_t nbytes = 0;  // ne[0] / block_size * type_size * ne[1] * ne[2] * ne[3]
  int64_t numel() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
  /// Bytes of one row of ne[0] elements.
  uint64_t row_bytes() const;
};

/// A parsed GGUF file over `data[0, size)`. Views (strings, tensor data) point into that buffer.
struct GgufFile {
  uint32_t version = 0;
  uint32_t alignment = kGgufDefaultAlignment;
  std::vector<GgufKeyValue> metadata;   // file order
  std::vector<GgufTensorInfo> tensors;  // file order
  uint64_t data_start = 0;              // offset of the data section in the buffer
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::shared_ptr<void> storage;  // keeps `data` alive (the mapping), may be null

  /// The value of `key`, or null.
  const GgufValue* Find(std::string_view key) const;
  /// The tensor called `name`, or null.
  const GgufTensorInfo* FindTensor(std::string_view name) const;
  /// The first byte of `t`'s data (inside the buffer: the parser checked it).
  const uint8_t* TensorData(const GgufTensorInfo& t) const { return data + data_start + t.offset; }

  // Indexes into metadata / tensors by name (filled by the parser).
  std::unordered_map<std::string, size_t> key_index;
  std::unordered_map<std::string, size_t> tensor_index;
};

/// True when `data` starts with the GGUF magic (needs at least 4 bytes).
bool HasGgufMagic(const uint8_t* data, size_t size);
/// True when the file at `path` starts with the GGUF magic (false when unreadable).
bool FileHasGgufMagic(const std::string& path);

/// Parses and validates a whole GGUF file held in `data[0, size)`; never reads outside it.
/// InvalidArgument naming the key or tensor for malformed input; Unimplemented for GGUF v1 and
/// big-endian files. `storage` (may be null) is kept in the result.
absl::StatusOr<GgufFile> ParseGguf(const uint8_t* data, size_t size,
                                   std::shared_ptr<void> storage = nullptr);

/// Memory-maps `path` read-only and parses it. Errors are prefixed with the path.
absl::StatusOr<GgufFile> OpenGguf(const std::string& path);

}  // namespace specontext
