#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/gemv.h"

namespace specontext::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;

__device__ __forceinline__ uint4 LoadStream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void Dot8(const uint4& a, const uint4& b, float& acc) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 fa = __bfloat1622float2(pa[e]), fb = __bfloat1622float2(pb[e]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
}

template <int N>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(GemvParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + warp) * kRowsPerWarp;
  if (row0 >= p.m) return;
  const int k_vec = p.k / 8;
  const uint4* x = static_cast<const uint4*>(p.x);
  const uint4* w = static_cast<const uint4*>(p.w);
  float acc[kRowsPerWarp][N] = {};
  const uint4* wr[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) wr[r] = w + size_t(min(row0 + r, p.m - 1)) * k_vec;
  // kDepth 16-byte weight loads per row in flight per lane before the first FMA: a warp's rows are a
  // serial chain of round trips to HBM, so deeper batches of loads mean fewer trips (4 measured better
  // than 2 on the H100 for the 4096-wide projections, whose warps each make only a few).
  constexpr int kDepth = N <= 2 ? 4 : 2;
  int j = lane;
  for (; j + 32 * (kDepth - 1) < k_vec; j += 32 * kDepth) {
    uint4 wv[kRowsPerWarp][kDepth];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int u = 0; u < kDepth; ++u) wv[r][u] = LoadStream(wr[r] + j + 32 * u);
    }
#pragma unroll
    for (int n = 0; n < N; ++n) {
      uint4 xv[kDepth];
#pragma unroll
      for (int u = 0; u < kDepth; ++u) xv[u] = x[size_t(n) * k_vec + j + 32 * u];
#pragma unroll
      for (int u = 0; u < kDepth; ++u) {
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) Dot8(wv[r][u], xv[u], acc[r][n]);
      }
    }
  }
  for (; j < k_vec; j += 32) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const uint4 wv = LoadStream(wr[r] + j);
#pragma unroll
      for (int n = 0; n < N; ++n) Dot8(wv, x[size_t(n) * k_vec + j], acc[r][n]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int n = 0; n < N; ++n) acc[r][n] = WarpSum(acc[r][n]);
  }
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + r;
    if (row >= p.m) break;
    float b = 0.0f;
    if (p.bias != nullptr) {
      b = p.bias_type == ElemType::kBF16 ? __bfloat162float(static_cast<const bf16*>(p.bias)[row])
                                         : static_cast<const float*>(p.bias)[row];
    }
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const float v = acc[r][n] + b;
      if (p.out_type == ElemType::kBF16) {
        static_cast<bf16*>(p.out)[size_t(n) * p.m + row] = __float2bfloat16(v);
      } else {
        static_cast<float*>(p.out)[size_t(n) * p.m + row] = v;
      }
    }
  }
}

template <int N>
cudaError_t LaunchN(const GemvParams& p, cudaStream_t stream) {
  const int rows_per_block = kWarps * kRowsPerWarp;
  GemvKernel<N><<<(p.m + rows_per_block - 1) / rows_per_block, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool GemvSupported(const GemvParams& p) {
  return p.n >= 1 && p.n <= kGemvMaxN && p.k % 8 == 0 && p.k > 0 && p.m > 0 && Aligned16(p.x) && Aligned16(p.w);
}

cudaError_t LaunchGemv(const GemvParams& p, cudaStream_t stream) {
  if (!GemvSupported(p)) return cudaErrorInvalidValue;
  switch (p.n) {
    case 1: return LaunchN<1>(p, stream);
    case 2: return LaunchN<2>(p, stream);
    case 3: return LaunchN<3>(p, stream);
    case 4: return LaunchN<4>(p, stream);
    case 5: return LaunchN<5>(p, stream);
    case 6: return LaunchN<6>(p, stream);
    case 7: return LaunchN<7>(p, stream);
    default: return LaunchN<8>(p, stream);
  }
}

}  // namespace specontext::cuda
