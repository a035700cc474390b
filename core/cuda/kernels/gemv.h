// Skinny GEMM for decode: out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias) with n <= kGemvMaxN.
// Streams w once with 16-byte loads; x rows are re-read from L1/L2. Used instead of cuBLAS only
// when CudaBackendOptions::gemv_max_n says so (bench/cuda_linear_bench measures both).
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
};

// True when the kernel handles this shape: 1 <= n <= kGemvMaxN, k % 8 == 0, 16-byte aligned rows.
bool GemvSupported(const GemvParams& p);
cudaError_t LaunchGemv(const GemvParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
