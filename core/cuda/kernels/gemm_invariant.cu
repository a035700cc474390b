// Batch-invariant GEMM (gemm_invariant.h): WMMA bf16 16x16x16 steps, f32 accumulators, one CTA per
// (BM rows of x, BN rows of w) tile, k walked in BK slices staged through shared memory with the next
// slice's loads in flight during the current one's steps.
#include <mma.h>

#include <cstdint>

#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/gemm_invariant.h"

namespace specontext::cuda {
namespace {

using namespace nvcuda;

// WM x WN warps, each FM x FN fragments of 16 x 16; BK columns of k per stage.
template <int WM, int WN, int FM, int FN, int BK>
struct GemmCfg {
  static constexpr int kThreads = 32 * WM * WN;
  static constexpr int kBM = WM * FM * 16, kBN = WN * FN * 16;
  static constexpr int kLda = BK + 8;   // bf16 per staged row: a multiple of 8, 16 bytes of skew
  static constexpr int kLdc = kBN + 4;  // f32 per epilogue row: a multiple of 4
  static constexpr int kChunksPerRow = BK / 8;  // 16-byte chunks per staged row
  static constexpr int kVecA = kBM * BK / 8 / kThreads;
  static constexpr int kVecB = kBN * BK / 8 / kThreads;
  static constexpr int kTileBytes = (kBM + kBN) * kLda * 2;
  static constexpr int kEpiBytes = kBM * kLdc * 4;
  static constexpr int kSmem = kTileBytes > kEpiBytes ? kTileBytes : kEpiBytes;
  static_assert(BK % 16 == 0 && kBM * BK % (8 * kThreads) == 0 && kBN * BK % (8 * kThreads) == 0);
};

// Eight bf16 of row `row` (of `rows`), columns [col, col + 8) of a [rows, k] matrix; zeros past either end.
__device__ __forceinline__ uint4 LoadChunk(const bf16* src, int rows, int k, int row, int col, bool vec) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (row >= rows || col >= k) return v;
  const bf16* ptr = src + size_t(row) * k + col;
  if (vec) return *reinterpret_cast<const uint4*>(ptr);  // k % 8 == 0: the whole chunk is inside
  uint16_t e[8];
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(ptr);
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = col + i < k ? raw[i] : uint16_t{0};
  v.x = e[0] | (uint32_t(e[1]) << 16);
  v.y = e[2] | (uint32_t(e[3]) << 16);
  v.z = e[4] | (uint32_t(e[5]) << 16);
  v.w = e[6] | (uint32_t(e[7]) << 16);
  return v;
}

template <int WM, int WN, int FM, int FN, int BK>
__global__ void __launch_bounds__(32 * WM * WN) GemmInvariantKernel(GemmInvariantParams p) {
  using Cfg = GemmCfg<WM, WN, FM, FN, BK>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kLda = Cfg::kLda, kLdc = Cfg::kLdc, kThreads = Cfg::kThreads;
  __shared__ __align__(128) unsigned char smem[Cfg::kSmem];
  bf16* s_a = reinterpret_cast<bf16*>(smem);  // [kBM][kLda]: rows of x
  bf16* s_b = s_a + kBM * kLda;               // [kBN][kLda]: rows of w (column-major B)
  float* s_c = reinterpret_cast<float*>(smem);  // [kBM][kLdc]: the tile's sums, after the main loop
  // Launched with PDL (elementwise.h): x is the previous kernel's output, so wait before any load.
  PdlTrigger();
  PdlWait();
  const int row0 = blockIdx.y * kBM, col0 = blockIdx.x * kBN;
  const int warp = threadIdx.x >> 5, wm = warp % WM, wn = warp / WM;
  const bf16* x = static_cast<const bf16*>(p.x);
  const bf16* w = static_cast<const bf16*>(p.w);
  const bool vec = p.k % 8 == 0 && (reinterpret_cast<uintptr_t>(p.x) & 15u) == 0 &&
                   (reinterpret_cast<uintptr_t>(p.w) & 15u) == 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  uint4 ra[Cfg::kVecA], rb[Cfg::kVecB];
  auto load = [&](int k0) {
#pragma unroll
    for (int i = 0; i < Cfg::kVecA; ++i) {
      const int c = threadIdx.x + i * kThreads;
      ra[i] = LoadChunk(x, p.n, p.k, row0 + c / Cfg::kChunksPerRow, k0 + c % Cfg::kChunksPerRow * 8, vec);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kVecB; ++i) {
      const int c = threadIdx.x + i * kThreads;
      rb[i] = LoadChunk(w, p.m, p.k, col0 + c / Cfg::kChunksPerRow, k0 + c % Cfg::kChunksPerRow * 8, vec);
    }
  };
  auto stage = [&]() {
#pragma unroll
    for (int i = 0; i < Cfg::kVecA; ++i) {
      const int c = threadIdx.x + i * kThreads;
      *reinterpret_cast<uint4*>(s_a + c / Cfg::kChunksPerRow * kLda + c % Cfg::kChunksPerRow * 8) = ra[i];
    }
#pragma unroll
    for (int i = 0; i < Cfg::kVecB; ++i) {
      const int c = threadIdx.x + i * kThreads;
      *reinterpret_cast<uint4*>(s_b + c / Cfg::kChunksPerRow * kLda + c % Cfg::kChunksPerRow * 8) = rb[i];
    }
  };

  load(0);
  for (int k0 = 0; k0 < p.k; k0 += BK) {
    stage();
    __syncthreads();
    if (k0 + BK < p.k) load(k0 + BK);  // in flight during this slice's steps
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      // Steps entirely past k are skipped, not added as zeros: the chain of steps of every element is
      // k = 0, 16, ... < p.k whatever BK (and so whatever tile) the launch uses.
      if (k0 + kk >= p.k) break;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], s_a + (wm * FM + i) * 16 * kLda + kk, kLda);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], s_b + (wn * FN + j) * 16 * kLda + kk, kLda);
#pragma unroll
      for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(s_c + (wm * FM + i) * 16 * kLdc + (wn * FN + j) * 16, acc[i][j], kLdc,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN, c = e % kBN, row = row0 + r, col = col0 + c;
    if (row >= p.n || col >= p.m) continue;
    float v = s_c[r * kLdc + c];
    if (p.bias != nullptr) {
      v += p.bias_type == ElemType::kBF16 ? __bfloat162float(static_cast<const bf16*>(p.bias)[col])
                                          : static_cast<const float*>(p.bias)[col];
    }
    if (p.out_type == ElemType::kBF16) {
      static_cast<bf16*>(p.out)[size_t(row) * p.m + col] = __float2bfloat16(v);
    } else {
      static_cast<float*>(p.out)[size_t(row) * p.m + col] = v;
    }
  }
}

template <int WM, int WN, int FM, int FN, int BK>
cudaError_t Launch(const GemmInvariantParams& p, cudaStream_t stream) {
  using Cfg = GemmCfg<WM, WN, FM, FN, BK>;
  const dim3 grid((p.m + Cfg::kBN - 1) / Cfg::kBN, (p.n + Cfg::kBM - 1) / Cfg::kBM);
  if (grid.y > 65535) return cudaErrorInvalidValue;
  return LaunchPdl(GemmInvariantKernel<WM, WN, FM, FN, BK>, grid, dim3(Cfg::kThreads), 0, stream, p);
}

}  // namespace

cudaError_t LaunchGemmInvariant(const GemmInvariantParams& p, cudaStream_t stream) {
  if (p.n < 1 || p.m < 1 || p.k < 1 || p.x == nullptr || p.w == nullptr || p.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int tile = p.tile_rows != 0 ? p.tile_rows : (p.n <= kGemmInvariantSmallN ? 16 : 64);
  // 16 rows: 2 warps over 32 weight rows (more CTAs for the few-row decode GEMMs), k in slices of 64.
  if (tile == 16) return Launch<1, 2, 1, 1, 64>(p, stream);
  // 64 rows: 2 x 2 warps of 32 x 32 over 64 weight rows, k in slices of 32.
  if (tile == 64) return Launch<2, 2, 2, 2, 32>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace specontext::cuda
