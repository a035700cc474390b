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

// Same expression as the SwiGLU kernel (swiglu.cu), so that the fused epilogue matches it bitwise.
__device__ __forceinline__ float Silu(float g) { return g / (1.0f + __expf(-g)); }

__device__ __forceinline__ float RoundBf16(float v) { return __bfloat162float(__float2bfloat16(v)); }

// kSwiGlu: a warp's two rows are gate row j and up row m + j of output j (one output per warp).
// Launched with PDL (elementwise.h): nothing but (with SPC_PDL=prefetch) an L2 prefetch of the weight rows
// before PdlWait; x and the output only after it.
template <int N, bool kSwiGlu>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(GemvParams p) {
  PdlTrigger();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = kSwiGlu ? blockIdx.x * kWarps + warp : (blockIdx.x * kWarps + warp) * kRowsPerWarp;
  const int k_vec = p.k / 8;
  const uint4* x = static_cast<const uint4*>(p.x);
  const uint4* w = static_cast<const uint4*>(p.w);
  float acc[kRowsPerWarp][N] = {};
  const uint4* wr[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    wr[r] = kSwiGlu ? w + (size_t(r) * p.m + min(row0, p.m - 1)) * k_vec : w + size_t(min(row0 + r, p.m - 1)) * k_vec;
    if (p.prefetch && lane == 0 && row0 < p.m) PrefetchL2(wr[r], static_cast<uint32_t>(k_vec) * 16u);
  }
  PdlWait();
  if (row0 >= p.m) return;
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
  if constexpr (kSwiGlu) {
    static_assert(kRowsPerWarp == 2, "gate and up rows");
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const float g = RoundBf16(acc[0][n] + 0.0f), u = RoundBf16(acc[1][n] + 0.0f);  // + 0: as the plain path (-0)
      static_cast<bf16*>(p.out)[size_t(n) * p.m + row0] = __float2bfloat16(Silu(g) * u);
    }
  } else {
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
}

// Few rows (o_proj, qkv and down_proj of a small model: m / 16 blocks would not fill the GPU twice):
// a block of kWarps warps per pair of rows, each warp one k-slice, partial sums combined in shared
// memory in a fixed order. kWarps times the warps in flight of GemvKernel for the same matrix.
template <int N, bool kSwiGlu>
__global__ void __launch_bounds__(kWarps * 32) GemvSplitKernel(GemvParams p) {
  PdlTrigger();
  __shared__ float part[kWarps][kRowsPerWarp][N];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = kSwiGlu ? blockIdx.x : blockIdx.x * kRowsPerWarp;
  const int k_vec = p.k / 8;
  const int chunk = (k_vec + kWarps - 1) / kWarps;
  const int begin = warp * chunk, end = min(k_vec, begin + chunk);
  const uint4* x = static_cast<const uint4*>(p.x);
  const uint4* w = static_cast<const uint4*>(p.w);
  const uint4* wr[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    wr[r] = kSwiGlu ? w + (size_t(r) * p.m + row0) * k_vec : w + size_t(min(row0 + r, p.m - 1)) * k_vec;
    if (p.prefetch && lane == 0 && end > begin) PrefetchL2(wr[r] + begin, static_cast<uint32_t>(end - begin) * 16u);
  }
  PdlWait();
  float acc[kRowsPerWarp][N] = {};
  constexpr int kDepth = 4;
  for (int j = begin + lane; j < end; j += 32 * kDepth) {
    uint4 wv[kRowsPerWarp][kDepth];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        wv[r][u] = j + 32 * u < end ? LoadStream(wr[r] + j + 32 * u) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int n = 0; n < N; ++n) {
#pragma unroll
      for (int u = 0; u < kDepth; ++u) {
        if (j + 32 * u >= end) break;
        const uint4 xv = x[size_t(n) * k_vec + j + 32 * u];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) Dot8(wv[r][u], xv, acc[r][n]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const float v = WarpSum(acc[r][n]);
      if (lane == 0) part[warp][r][n] = v;
    }
  }
  __syncthreads();
  if constexpr (kSwiGlu) {
    // Thread n: output n's gate and up sums over the warps' slices, in warp order.
    if (threadIdx.x >= N) return;
    const int n = threadIdx.x;
    float gs = 0.0f, us = 0.0f;
#pragma unroll
    for (int q = 0; q < kWarps; ++q) {
      gs += part[q][0][n];
      us += part[q][1][n];
    }
    const float g = RoundBf16(gs + 0.0f), u = RoundBf16(us + 0.0f);  // + 0: as the plain path (-0)
    static_cast<bf16*>(p.out)[size_t(n) * p.m + row0] = __float2bfloat16(Silu(g) * u);
  } else {
    if (threadIdx.x >= kRowsPerWarp * N) return;
    const int r = threadIdx.x / N, n = threadIdx.x % N;
    const int row = row0 + r;
    if (row >= p.m) return;
    float v = 0.0f;
#pragma unroll
    for (int q = 0; q < kWarps; ++q) v += part[q][r][n];
    float b = 0.0f;
    if (p.bias != nullptr) {
      b = p.bias_type == ElemType::kBF16 ? __bfloat162float(static_cast<const bf16*>(p.bias)[row])
                                         : static_cast<const float*>(p.bias)[row];
    }
    v += b;
    if (p.out_type == ElemType::kBF16) {
      static_cast<bf16*>(p.out)[size_t(n) * p.m + row] = __float2bfloat16(v);
    } else {
      static_cast<float*>(p.out)[size_t(n) * p.m + row] = v;
    }
  }
}

// Streaming multiprocessors of the current device (queried once per process: one GPU per process).
int SmCount() {
  static const int count = [] {
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return 132;
    }
    return sms;
  }();
  return count;
}

template <int N>
cudaError_t LaunchN(const GemvParams& p, cudaStream_t stream) {
  // Rows per block of GemvKernel: kWarps (swiglu: one output per warp) or kWarps * kRowsPerWarp.
  const int per_block = p.swiglu ? kWarps : kWarps * kRowsPerWarp;
  const dim3 block(kWarps * 32);
  if ((p.m + per_block - 1) / per_block < 2 * SmCount()) {
    if (p.swiglu) return LaunchPdl(GemvSplitKernel<N, true>, dim3(p.m), block, 0, stream, p);
    return LaunchPdl(GemvSplitKernel<N, false>, dim3((p.m + kRowsPerWarp - 1) / kRowsPerWarp), block, 0, stream, p);
  }
  if (p.swiglu) return LaunchPdl(GemvKernel<N, true>, dim3((p.m + kWarps - 1) / kWarps), block, 0, stream, p);
  const int rows_per_block = kWarps * kRowsPerWarp;
  return LaunchPdl(GemvKernel<N, false>, dim3((p.m + rows_per_block - 1) / rows_per_block), block, 0, stream, p);
}

}  // namespace

bool GemvSupported(const GemvParams& p) {
  if (p.swiglu && (p.bias != nullptr || p.out_type != ElemType::kBF16)) return false;
  return p.n >= 1 && p.n <= kGemvMaxN && p.k % 8 == 0 && p.k > 0 && p.m > 0 && Aligned16(p.x) && Aligned16(p.w);
}

cudaError_t LaunchGemv(const GemvParams& params, cudaStream_t stream) {
  if (!GemvSupported(params)) return cudaErrorInvalidValue;
  GemvParams p = params;
  p.prefetch = PdlMode() == kPdlPrefetch && PdlActive(stream);
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
