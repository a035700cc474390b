// Skinny GEMM for decode: out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias) with n <= kGemvMaxN.
// Streams w once with 16-byte loads; x rows are re-read from L1/L2. Used instead of cuBLAS only when
// CudaBackendOptions::gemv_max_n says so. Each warp takes two weight rows over a slice of k; `split` warps
// share a row pair when there are too few rows to keep the GPU's memory system busy (the projections of a 1B
// model). A block's first weight loads are issued before its PDL wait, so they are in flight while the kernel
// before it drains (weights are never written during a step).
#pragma once

#include <cuda_runtime.h>

#include "core/cuda/kernels/elementwise.h"
#include "core/cuda/kernels/linear_operands.h"

namespace specontext::cuda {

constexpr int kGemvMaxN = 8;

struct GemvParams : LinearOperands {
  // Gated MLP input projection with SwiGLU in the epilogue: w is [2 m, k] (gate rows, then up rows) and
  // out [n, m] bf16 = silu(g) * u with g = x·w[j], u = x·w[m + j] each rounded to bf16 first, so the
  // result is bitwise that of the plain GEMV into [n, 2 m] followed by LaunchSwiGlu. No bias.
  bool swiglu = false;
  // Warps sharing one row pair's k: 1, 2, 4 or 8, or 0 for GemvSplit's choice. It fixes the order of the sums,
  // so every path that must agree bitwise leaves it at 0 (the choice depends on the weight's shape only).
  int split = 0;
};

// True when the kernel handles this shape: 1 <= n <= kGemvMaxN, k % 8 == 0, 16-byte aligned rows (swiglu:
// bf16 out, no bias), split 0, 1, 2, 4 or 8.
bool GemvSupported(const GemvParams& p);
// The split LaunchGemv uses for p (p.split, or the choice for the weight's rows and k).
int GemvSplit(const GemvParams& p);
cudaError_t LaunchGemv(const GemvParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
