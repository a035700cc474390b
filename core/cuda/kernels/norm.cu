// RMSNorm and residual-add + RMSNorm: one block per row, f32 statistics.
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {
namespace {

constexpr int kThreads = 256;

// With a residual: r = residual + x is rounded to T, stored, and normalised (as a framework doing
// the add in T would). The second pass re-reads what this same thread wrote, so no barrier is needed.
template <typename T, bool kResidual>
__global__ void __launch_bounds__(kThreads) RmsNormKernel(RmsNormParams p) {
  PdlTrigger();
  PdlWait();  // launched with PDL (elementwise.h)
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.d;
  T* res = kResidual ? static_cast<T*>(p.residual) + row * p.d : nullptr;
  const T* w = static_cast<const T*>(p.w);
  T* out = static_cast<T*>(p.out) + row * p.d;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < p.d; j += kThreads) {
    float v = ToF32(x[j]);
    if constexpr (kResidual) {
      const T r = FromF32<T>(ToF32(res[j]) + v);
      res[j] = r;
      v = ToF32(r);
    }
    ss += v * v;
  }
  ss = BlockSum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(p.d) + p.eps);
  const T* src = kResidual ? res : x;
  for (int64_t j = threadIdx.x; j < p.d; j += kThreads) {
    out[j] = FromF32<T>(ToF32(src[j]) * inv * ToF32(w[j]));
  }
}

// Vector j of a bf16 row: with a residual, res[j] = bf16(res[j] + x[j]) is stored and returned; adds the
// vector's squares to ss element by element (the same order in both kernels' paths).
template <bool kResidual>
__device__ __forceinline__ Bf16x8 LoadRowVector(const Bf16x8* x, Bf16x8* res, int64_t j, float& ss) {
  Bf16x8 v = x[j];
  if constexpr (kResidual) {
    const Bf16x8 r = res[j];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 a = __bfloat1622float2(v.v[e]), b = __bfloat1622float2(r.v[e]);
      v.v[e] = __floats2bfloat162_rn(a.x + b.x, a.y + b.y);
    }
    res[j] = v;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 a = __bfloat1622float2(v.v[e]);
    ss += a.x * a.x + a.y * a.y;
  }
  return v;
}

__device__ __forceinline__ Bf16x8 NormalisedVector(const Bf16x8& v, const Bf16x8& g, float inv) {
  Bf16x8 o;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 a = __bfloat1622float2(v.v[e]), b = __bfloat1622float2(g.v[e]);
    o.v[e] = __floats2bfloat162_rn(a.x * inv * b.x, a.y * inv * b.y);
  }
  return o;
}

// bf16 rows whose size is a multiple of 8: 16-byte accesses.
template <bool kResidual>
__global__ void __launch_bounds__(kThreads) RmsNormBf16x8Kernel(RmsNormParams p) {
  PdlTrigger();
  PdlWait();  // launched with PDL (elementwise.h)
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t n_vec = p.d / 8;
  const Bf16x8* x = static_cast<const Bf16x8*>(p.x) + row * n_vec;
  Bf16x8* res = kResidual ? static_cast<Bf16x8*>(p.residual) + row * n_vec : nullptr;
  const Bf16x8* w = static_cast<const Bf16x8*>(p.w);
  Bf16x8* out = static_cast<Bf16x8*>(p.out) + row * n_vec;
  float ss = 0.0f;
  if (n_vec <= kThreads) {
    // A row of at most kThreads vectors (hidden sizes up to 2048): each thread keeps its vector and its
    // weights in registers across the reduction (the weights load before it), the same arithmetic as below.
    const int j = threadIdx.x;
    const bool on = j < n_vec;
    Bf16x8 v{}, g{};
    if (on) {
      g = w[j];
      v = LoadRowVector<kResidual>(x, res, j, ss);
    }
    ss = BlockSum(ss, scratch);
    const float inv = rsqrtf(ss / static_cast<float>(p.d) + p.eps);
    if (on) out[j] = NormalisedVector(v, g, inv);
    return;
  }
  for (int64_t j = threadIdx.x; j < n_vec; j += kThreads) LoadRowVector<kResidual>(x, res, j, ss);
  ss = BlockSum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(p.d) + p.eps);
  const Bf16x8* src = kResidual ? res : x;
  for (int64_t j = threadIdx.x; j < n_vec; j += kThreads) out[j] = NormalisedVector(src[j], w[j], inv);
}

}  // namespace

cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.d == 0) return cudaSuccess;
  const bool res = p.residual != nullptr;
  const dim3 grid(static_cast<unsigned>(p.n)), block(kThreads);
  if (p.type == ElemType::kBF16) {
    const bool vec = p.d % 8 == 0 && Aligned16(p.x) && Aligned16(p.w) && Aligned16(p.out) &&
                     (!res || Aligned16(p.residual));
    if (vec) return LaunchPdl(res ? RmsNormBf16x8Kernel<true> : RmsNormBf16x8Kernel<false>, grid, block, 0, stream, p);
    return LaunchPdl(res ? RmsNormKernel<bf16, true> : RmsNormKernel<bf16, false>, grid, block, 0, stream, p);
  }
  return LaunchPdl(res ? RmsNormKernel<float, true> : RmsNormKernel<float, false>, grid, block, 0, stream, p);
}

}  // namespace specontext::cuda
