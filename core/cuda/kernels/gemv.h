// Skinny GEMM for decode: out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias) with n <= kGemvMaxN.
// Streams w once with 16-byte loads; x rows are re-read from L1/L2. Used instead of cuBLAS only
// when CudaBackendOptions::gemv_max_n says so (bench/cuda_linear_bench measures both). Two grids: a block
// per 16 rows, or, when that would not fill the GPU twice (the projections of a 1B model), a block per
// row pair with k split over its warps (more loads in flight: the dense 1B decode step at 2K 1.37 -> 1.31 ms, H100).
#pragma once

#include <cuda_runtime.h>

#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {

constexpr int kGemvMaxN = 8;

struct GemvParams {
  const void* x = nullptr;     // bf16 [n, k]
  const void* w = nullptr;     // bf16 [m, k]
  const void* bias = nullptr;  // [m] of bias_type, or null
  void* out = nullptr;         // [n, m] of out_type
  int n = 0;
  int m = 0;
  int k = 0;
  ElemType out_type = ElemType::kBF16;
  ElemType bias_type = ElemType::kBF16;
  // Gated MLP input projection with SwiGLU in the epilogue: w is [2 m, k] (gate rows, then up rows) and
  // out [n, m] bf16 = silu(g) * u with g = x·w[j], u = x·w[m + j] each rounded to bf16 first, so the
  // result is bitwise that of the plain GEMV into [n, 2 m] followed by LaunchSwiGlu. No bias.
  bool swiglu = false;
  // Set by LaunchGemv, not the caller: the launch takes PDL with SPC_PDL=prefetch (elementwise.h), so the
  // weight rows go to L2 before the wait for the kernel before (A/B only: measured slower).
  bool prefetch = false;
};

// True when the kernel handles this shape: 1 <= n <= kGemvMaxN, k % 8 == 0, 16-byte aligned rows (swiglu:
// bf16 out, no bias).
bool GemvSupported(const GemvParams& p);
cudaError_t LaunchGemv(const GemvParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
