// The operands of one bf16 Linear, out[n, m] = x[n, k] · w[m, k]ᵀ (+ bias), shared by the kernels that
// compute it (gemv.h, gemm_invariant.h), so a caller fills them once and picks the kernel after.
#pragma once

#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {

struct LinearOperands {
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

}  // namespace specontext::cuda
