// Batch-invariant GEMM: out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias), bf16 inputs, f32 accumulation, for any n.
//
// Why: cuBLAS picks its kernel, tile and split-K by the shape, and the custom GEMV (gemv.h) serves only a
// few rows with a split chosen by n, so a row's bits change with the number of rows it is computed with.
// Here every output element is one chain of tensor-core steps over k = 0, 16, 32, ... in ascending order
// into one f32 accumulator (steps past k skipped, never added as zeros), whatever n is and whatever tile the
// launch picks: a row's result depends on that row of x and on w only. The tile (16 or 64 rows per CTA)
// only changes which CTA computes an element, not how.
//
// Cost: no split-K and simple two-stage pipelining; prefill runs well below cuBLAS, decode reads the
// weights once per 16 or 64 rows (docs/gpu.md "Batch-invariant decoding").
#pragma once

#include <cuda_runtime.h>

#include "core/cuda/kernels/linear_operands.h"

namespace specontext::cuda {

// The bias, when set, is added to the f32 sum before the one rounding.
struct GemmInvariantParams : LinearOperands {
  // 0: by n (16-row tiles up to kGemmInvariantSmallN rows, 64-row tiles above); 16 or 64 forces one (tests
  // check that both give the same bits).
  int tile_rows = 0;
};

constexpr int kGemmInvariantSmallN = 16;

// Any n, m, k >= 1; 16-byte loads when k % 8 == 0 and x, w are 16-byte aligned, element loads otherwise.
cudaError_t LaunchGemmInvariant(const GemmInvariantParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
