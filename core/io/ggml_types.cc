#include "core/io/ggml_types.h"

#include "absl/strings/str_cat.h"

namespace specontext {
namespace {

constexpr uint32_t kQK_K = 256;  // super-block size of the K-quants (ggml's QK_K)

}  // namespace

std::optional<GgmlTypeTraits> GgmlTypeTraitsOf(uint32_t id) {
  // Sizes from GGML_QUANT_SIZES (gguf-py constants.py): (block size, bytes per block).
  switch (static_cast<GgmlType>(id)) {
    case GgmlType::kF32:
      return GgmlTypeTraits{"F32", 1, 4};
    case GgmlType::kF16:
      return GgmlTypeTraits{"F16", 1, 2};
    case GgmlType::kQ4_0:
      return GgmlTypeTraits{"Q4_0", 32, 2 + 16};
    case GgmlType::kQ4_1:
      return GgmlTypeTraits{"Q4_1", 32, 2 + 2 + 16};
    case GgmlType::kQ5_0:
      return GgmlTypeTraits{"Q5_0", 32, 2 + 4 + 16};
    case GgmlType::kQ5_1:
      return GgmlTypeTraits{"Q5_1", 32, 2 + 2 + 4 + 16};
    case GgmlType::kQ8_0:
      return GgmlTypeTraits{"Q8_0", 32, 2 + 32};
    case GgmlType::kQ8_1:
      return GgmlTypeTraits{"Q8_1", 32, 4 + 4 + 32};
    case GgmlType::kQ2_K:
      return GgmlTypeTraits{"Q2_K", kQK_K, 2 + 2 + kQK_K / 16 + kQK_K / 4};
    case GgmlType::kQ3_K:
      return GgmlTypeTraits{"Q3_K", kQK_K, 2 + kQK_K / 4 + kQK_K / 8 + 12};
    case GgmlType::kQ4_K:
      return GgmlTypeTraits{"Q4_K", kQK_K, 2 + 2 + kQK_K / 2 + 12};
    case GgmlType::kQ5_K:
      return GgmlTypeTraits{"Q5_K", kQK_K, 2 + 2 + kQK_K / 2 + kQK_K / 8 + 12};
    case GgmlType::kQ6_K:
      return GgmlTypeTraits{"Q6_K", kQK_K, 2 + kQK_K / 2 + kQK_K / 4 + kQK_K / 16};
    case GgmlType::kQ8_K:
      return GgmlTypeTraits{"Q8_K", kQK_K, 4 + kQK_K + kQK_K / 8};
    case GgmlType::kIQ2_XXS:
      return GgmlTypeTraits{"IQ2_XXS", kQK_K, 2 + kQK_K / 4};
    case GgmlType::kIQ2_XS:
      return GgmlTypeTraits{"IQ2_XS", kQK_K, 2 + kQK_K / 4 + kQK_K / 32};
    case GgmlType::kIQ3_XXS:
      return GgmlTypeTraits{"IQ3_XXS", kQK_K, 2 + kQK_K / 4 + kQK_K / 8};
    case GgmlType::kIQ1_S:
      return GgmlTypeTraits{"IQ1_S", kQK_K, 2 + kQK_K / 8 + kQK_K / 16};
    case GgmlType::kIQ4_NL:
      return GgmlTypeTraits{"IQ4_NL", 32, 2 + 16};
    case GgmlType::kIQ3_S:
      return GgmlTypeTraits{"IQ3_S", kQK_K, 2 + kQK_K / 4 + kQK_K / 8 + kQK_K / 32 + 4};
    case GgmlType::kIQ2_S:
      return GgmlTypeTraits{"IQ2_S", kQK_K, 2 + kQK_K / 4 + kQK_K / 16};
    case GgmlType::kIQ4_XS:
      return GgmlTypeTraits{"IQ4_XS", kQK_K, 2 + 2 + kQK_K / 2 + kQK_K / 64};
    case GgmlType::kI8:
      return GgmlTypeTraits{"I8", 1, 1};
    case GgmlType::kI16:
      return GgmlTypeTraits{"I16", 1, 2};
    case GgmlType::kI32:
      return GgmlTypeTraits{"I32", 1, 4};
    case GgmlType::kI64:
      return GgmlTypeTraits{"I64", 1, 8};
    case GgmlType::kF64:
      return GgmlTypeTraits{"F64", 1, 8};
    case GgmlType::kIQ1_M:
      return GgmlTypeTraits{"IQ1_M", kQK_K, kQK_K / 8 + kQK_K / 16 + kQK_K / 32};
    case GgmlType::kBF16:
      return GgmlTypeTraits{"BF16", 1, 2};
    case GgmlType::kTQ1_0:
      return GgmlTypeTraits{"TQ1_0", kQK_K, 2 + 4 * 13};
    case GgmlType::kTQ2_0:
      return GgmlTypeTraits{"TQ2_0", kQK_K, 2 + 64};
    case GgmlType::kMXFP4:
      return GgmlTypeTraits{"MXFP4", 32, 1 + 16};
    case GgmlType::kNVFP4:
      return GgmlTypeTraits{"NVFP4", 64, 4 + 32};
    case GgmlType::kQ1_0:
      return GgmlTypeTraits{"Q1_0", 128, 2 + 16};
  }
  return std::nullopt;
}

std::string GgmlTypeName(GgmlType type) {
  const std::optional<GgmlTypeTraits> t = GgmlTypeTraitsOf(type);
  return t ? std::string(t->name) : absl::StrCat("type ", static_cast<uint32_t>(type));
}

}  // namespace specontext
