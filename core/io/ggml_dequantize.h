// Dequantization of ggml blocks to f32: the plain float types (F32, F16, BF16), the legacy
// 32-element quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the 256-element K-quants (Q2_K, Q3_K, Q4_K,
// Q5_K, Q6_K).
//
// Results are exactly those of ggml's reference dequantizers (dequantize_row_* in ggml-quants.c)
// and of the gguf Python package's quants.py: every element is computed in f32 with the same
// operations in the same order (the file is built with -ffp-contract=off so no fused multiply-add
// changes a rounding).
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "core/io/ggml_types.h"

namespace specontext {

/// Whether DequantizeGgml handles `type`.
bool CanDequantizeGgml(GgmlType type);

/// Dequantizes `n` elements of `type` from `src` (n / block_size blocks of type_size bytes, any
/// alignment, `src_bytes` long) into `dst[0, n)`. InvalidArgument naming the type when it is not
/// one of the supported types (e.g. IQ2_XS), when n is not a whole number of blocks, or when
/// `src_bytes` is not exactly the blocks' size.
absl::Status DequantizeGgml(GgmlType type, const uint8_t* src, size_t src_bytes, int64_t n,
                            float* dst);

}  // namespace specontext
