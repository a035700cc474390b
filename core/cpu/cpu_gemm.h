// Linear layers on the CPU: f32 weights go to OpenBLAS sgemm/sgemv; bf16 weights (half the bytes,
// which is what decode is bound by) use a vectorised bf16 GEMV for a few rows. Prefill runs one
// OpenBLAS sgemm per fixed-size block of weight rows (converted to f32 for bf16). The thread pool
// (parallel_for.h) splits the weight rows; each output element comes out the same whatever the
// thread count. With `row_invariant` each output row also comes out the same whatever the other rows
// (and their number): every row takes the one-row path (bf16: the GEMV, f32: sgemv), so prefill streams the
// weights once per row instead of once per block (Backend::set_batch_invariant).
#pragma once

#include <cstdint>

namespace specontext {

// out[n, m] = x[n, k] · w[m, k]ᵀ, w in bf16 (uint16 bit patterns).
void LinearBf16(const float* x, const uint16_t* w, float* out, int64_t n, int64_t k, int64_t m,
                bool row_invariant = false);
// out[n, m] = x[n, k] · w[m, k]ᵀ in f32.
void LinearF32(const float* x, const float* w, float* out, int64_t n, int64_t k, int64_t m,
               bool row_invariant = false);

}  // namespace specontext
