#include <algorithm>
#include <atomic>

#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/gemv.h"

namespace specontext::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRows = 2;  // weight rows per warp (SwiGLU: an output's gate and up rows)
// 16-byte weight loads per row in flight per lane before the first FMA: a warp's rows are a serial chain of
// round trips to HBM, so deeper batches mean fewer trips; registers bound it at larger n.
#ifndef SPC_GEMV_DEPTH
#define SPC_GEMV_DEPTH 4
#endif
template <int N>
constexpr int kDepth = N <= 2 ? SPC_GEMV_DEPTH : 2;

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

// One block of kWarps warps; `split` consecutive warps share a row group (plain: rows 2 g and 2 g + 1; SwiGLU:
// output g's gate row g and up row m + g), each taking one slice of k; partial sums are combined in shared
// memory in slice order. Launched with PDL (elementwise.h): before PdlWait only weight loads.
template <int N, bool kSwiGlu>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(GemvParams p) {
  PdlTrigger();
  constexpr int D = kDepth<N>;
  __shared__ float part[kWarps][kRows][N];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int split = p.split;
  const int group = blockIdx.x * (kWarps / split) + warp / split, slice = warp % split;
  const int row0 = kSwiGlu ? group : group * kRows;
  const bool active = row0 < p.m;
  const int k_vec = p.k / 8;
  const int chunk = (k_vec + split - 1) / split;
  const int begin = min(k_vec, slice * chunk), end = min(k_vec, begin + chunk);
  const uint4* w = static_cast<const uint4*>(p.w);
  const uint4* wr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    wr[r] = kSwiGlu ? w + (size_t(r) * p.m + min(row0, p.m - 1)) * k_vec : w + size_t(min(row0 + r, p.m - 1)) * k_vec;
  }
  uint4 wv[kRows][D];
  auto load_batch = [&](int j) {
#pragma unroll
    for (int u = 0; u < D; ++u) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) wv[r][u] = j + 32 * u < end ? LoadStream(wr[r] + j + 32 * u) : make_uint4(0, 0, 0, 0);
    }
  };
  int j = begin + lane;
  if (active) load_batch(j);
  PdlWait();
  // The thread that writes the block's rows: lane 0 of each group's first warp.
  const bool writer = lane == 0 && slice == 0 && active;
  const uint4* x = static_cast<const uint4*>(p.x);
  float acc[kRows][N] = {};
  if (active) {
    while (j < end) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
#pragma unroll
        for (int u = 0; u < D; ++u) {
          if (j + 32 * u >= end) break;
          const uint4 xv = x[size_t(n) * k_vec + j + 32 * u];
#pragma unroll
          for (int r = 0; r < kRows; ++r) Dot8(wv[r][u], xv, acc[r][n]);
        }
      }
      j += 32 * D;
      if (j < end) load_batch(j);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int n = 0; n < N; ++n) acc[r][n] = WarpSum(acc[r][n]);
  }
  if (split > 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int n = 0; n < N; ++n) part[warp][r][n] = acc[r][n];
      }
    }
    __syncthreads();
    if (writer) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int n = 0; n < N; ++n) {
          float v = 0.0f;
          for (int q = 0; q < split; ++q) v += part[warp + q][r][n];
          acc[r][n] = v;
        }
      }
    }
  }
  if (writer) {
    if constexpr (kSwiGlu) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float g = RoundBf16(acc[0][n] + 0.0f), u = RoundBf16(acc[1][n] + 0.0f);  // + 0: as the plain path (-0)
        static_cast<bf16*>(p.out)[size_t(n) * p.m + row0] = __float2bfloat16(Silu(g) * u);
      }
    } else {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
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
}

// Blocks of `split` that a matrix of p's rows needs.
int64_t Blocks(const GemvParams& p, int split) {
  const int64_t rows_per_block = (p.swiglu ? 1 : kRows) * (kWarps / split);
  return (int64_t{p.m} + rows_per_block - 1) / rows_per_block;
}

// Blocks of GemvKernel<N, false> the whole GPU holds at once (the plain kernel's, also for SwiGLU: the split
// must be the same for both so that LinearSwiGlu matches Linear + SwiGlu bitwise). Queried once per process
// and n (one GPU per process).
int Wave(int n) {
  static std::atomic<int> waves[kGemvMaxN + 1] = {};
  int w = waves[n].load(std::memory_order_relaxed);
  if (w == 0) {
    static constexpr void (*kernels[kGemvMaxN])(GemvParams) = {
        GemvKernel<1, false>, GemvKernel<2, false>, GemvKernel<3, false>, GemvKernel<4, false>,
        GemvKernel<5, false>, GemvKernel<6, false>, GemvKernel<7, false>, GemvKernel<8, false>};
    int dev = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernels[n - 1], kWarps * 32, 0) != cudaSuccess) {
      cudaGetLastError();
      sms = 132;
      per_sm = 4;
    }
    w = std::max(1, sms * per_sm);
    waves[n].store(w, std::memory_order_relaxed);
  }
  return w;
}

template <int N>
cudaError_t LaunchN(const GemvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(Blocks(p, p.split))), block(kWarps * 32);
  if (p.swiglu) return LaunchPdl(GemvKernel<N, true>, grid, block, 0, stream, p);
  return LaunchPdl(GemvKernel<N, false>, grid, block, 0, stream, p);
}

}  // namespace

bool GemvSupported(const GemvParams& p) {
  if (p.swiglu && (p.bias != nullptr || p.out_type != ElemType::kBF16)) return false;
  if (p.split != 0 && p.split != 1 && p.split != 2 && p.split != 4 && p.split != 8) return false;
  return p.n >= 1 && p.n <= kGemvMaxN && p.k % 8 == 0 && p.k > 0 && p.m > 0 && Aligned16(p.x) && Aligned16(p.w);
}

int GemvSplit(const GemvParams& p) {
  if (p.split != 0) return p.split;
  // The more warps stream one matrix, the shorter its ramp and tail, as long as each lane still makes two
  // loads per row and the grid does not end in a small second wave (H100, Llama-3.2-1B and -3.1-8B
  // projections at n = 1: bench/probes/gemv_chain_probe.cu, docs/benchmarks.md
  // "Findings: launches and kernels").
  const int64_t wave = Wave(p.n);
  int best = 1;
  for (int split = 2; split <= kWarps && p.k / 8 >= 64 * split; split *= 2) {
    const int64_t blocks = Blocks(p, split);
    if (blocks <= wave || blocks * 2 >= wave * 3) best = split;
  }
  return best;
}

cudaError_t LaunchGemv(const GemvParams& params, cudaStream_t stream) {
  if (!GemvSupported(params)) return cudaErrorInvalidValue;
  GemvParams p = params;
  p.split = GemvSplit(params);
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
