// SwiGLU and bias add: flat element-wise kernels, 16-byte accesses where the sizes allow.
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {
namespace {

__device__ __forceinline__ float Silu(float g) { return g / (1.0f + __expf(-g)); }

__global__ void SwiGluX8Kernel(const Bf16x8* gate, const Bf16x8* up, Bf16x8* out, int64_t n_vec) {
  PdlTrigger();
  PdlWait();  // launched with PDL (elementwise.h)
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n_vec; i += int64_t{gridDim.x} * blockDim.x) {
    const Bf16x8 g = gate[i], u = up[i];
    Bf16x8 o;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 a = __bfloat1622float2(g.v[e]), b = __bfloat1622float2(u.v[e]);
      o.v[e] = __floats2bfloat162_rn(Silu(a.x) * b.x, Silu(a.y) * b.y);
    }
    out[i] = o;
  }
}

__global__ void SwiGluKernel(const bf16* gate, const bf16* up, bf16* out, int64_t n) {
  PdlTrigger();
  PdlWait();  // launched with PDL (elementwise.h)
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __float2bfloat16(Silu(__bfloat162float(gate[i])) * __bfloat162float(up[i]));
  }
}

template <typename TO, typename TB>
__global__ void BiasAddKernel(TO* out, const TB* bias, int64_t n, int64_t m) {
  PdlTrigger();
  PdlWait();  // launched with PDL (elementwise.h)
  const int64_t total = n * m;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = FromF32<TO>(ToF32(out[i]) + ToF32(bias[i % m]));
  }
}

int GridFor(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

cudaError_t LaunchSwiGlu(const SwiGluParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  if (p.numel % 8 == 0 && Aligned16(p.gate) && Aligned16(p.up) && Aligned16(p.out)) {
    const int64_t n_vec = p.numel / 8;
    return LaunchPdl(SwiGluX8Kernel, dim3(GridFor(n_vec, kThreads)), dim3(kThreads), 0, stream,
                     static_cast<const Bf16x8*>(p.gate), static_cast<const Bf16x8*>(p.up),
                     static_cast<Bf16x8*>(p.out), n_vec);
  }
  return LaunchPdl(SwiGluKernel, dim3(GridFor(p.numel, kThreads)), dim3(kThreads), 0, stream,
                   static_cast<const bf16*>(p.gate), static_cast<const bf16*>(p.up), static_cast<bf16*>(p.out),
                   p.numel);
}

cudaError_t LaunchBiasAdd(const BiasAddParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.m == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int grid = GridFor(p.n * p.m, kThreads);
  const bool ob = p.out_type == ElemType::kBF16, bb = p.bias_type == ElemType::kBF16;
  const dim3 g(grid), b(kThreads);
  if (ob && bb) {
    return LaunchPdl(BiasAddKernel<bf16, bf16>, g, b, 0, stream, static_cast<bf16*>(p.out),
                     static_cast<const bf16*>(p.bias), p.n, p.m);
  }
  if (ob) {
    return LaunchPdl(BiasAddKernel<bf16, float>, g, b, 0, stream, static_cast<bf16*>(p.out),
                     static_cast<const float*>(p.bias), p.n, p.m);
  }
  if (bb) {
    return LaunchPdl(BiasAddKernel<float, bf16>, g, b, 0, stream, static_cast<float*>(p.out),
                     static_cast<const bf16*>(p.bias), p.n, p.m);
  }
  return LaunchPdl(BiasAddKernel<float, float>, g, b, 0, stream, static_cast<float*>(p.out),
                   static_cast<const float*>(p.bias), p.n, p.m);
}

}  // namespace specontext::cuda
