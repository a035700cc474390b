// The ggml tensor types a GGUF file may name, and their block layout.
//
// Every ggml type stores a row as consecutive blocks: `block_size` elements packed into `type_size`
// bytes (1 and sizeof(element) for the plain types). The ids and sizes are the gguf Python
// package's GGMLQuantizationType and GGML_QUANT_SIZES (gguf-py/gguf/constants.py, gguf 0.19), which
// mirror ggml.h's enum ggml_type; ids missing there (4, 5, 31-33, 36-38: removed types) are
// unknown.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace specontext {

enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
  kNVFP4 = 40,
  kQ1_0 = 41,
};

/// Block layout of one ggml type.
struct GgmlTypeTraits {
  const char* name;     // ggml's spelling: "Q4_K", "F16", ...
  uint32_t block_size;  // elements per block
  uint32_t type_size;   // bytes per block
};

/// The traits of the type with id `id`, or nullopt for an id no ggml version defines (today).
std::optional<GgmlTypeTraits> GgmlTypeTraitsOf(uint32_t id);
inline std::optional<GgmlTypeTraits> GgmlTypeTraitsOf(GgmlType t) {
  return GgmlTypeTraitsOf(static_cast<uint32_t>(t));
}

/// "Q4_K", or "type 31" for an unknown id.
std::string GgmlTypeName(GgmlType type);

/// The parser refuses tensors of more elements, so byte counts and offsets stay far from overflow.
inline constexpr int64_t kMaxGgmlElements = int64_t{1} << 50;

}  // namespace specontext
