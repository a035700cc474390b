// Row gather (embedding lookup, and picking the last token's activations out of a ragged batch).
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {
namespace {

// One block per output row; VecT is the access width (uint4 when every row is 16-byte aligned).
template <typename VecT>
__global__ void GatherRowsKernel(GatherRowsParams p) {
  const int64_t i = blockIdx.x;
  const int32_t id = p.ids[i];
  const int64_t n_vec = p.row_bytes / sizeof(VecT);
  VecT* dst = reinterpret_cast<VecT*>(static_cast<char*>(p.out) + i * p.row_bytes);
  if (id < 0 || id >= p.n_rows) {
    if (threadIdx.x == 0) atomicExch(p.error_flag, 1);
    VecT zero;
    memset(&zero, 0, sizeof(zero));
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) dst[j] = zero;
    return;
  }
  const VecT* src = reinterpret_cast<const VecT*>(static_cast<const char*>(p.table) + id * p.row_bytes);
  for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) dst[j] = src[j];
}

}  // namespace

cudaError_t LaunchGatherRows(const GatherRowsParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const bool vec16 = p.row_bytes % 16 == 0 && Aligned16(p.table) && Aligned16(p.out);
  const bool vec4 = p.row_bytes % 4 == 0 && (reinterpret_cast<uintptr_t>(p.table) & 3) == 0 &&
                    (reinterpret_cast<uintptr_t>(p.out) & 3) == 0;
  const int threads = 128;
  if (vec16) {
    GatherRowsKernel<uint4><<<p.n, threads, 0, stream>>>(p);
  } else if (vec4) {
    GatherRowsKernel<uint32_t><<<p.n, threads, 0, stream>>>(p);
  } else {
    GatherRowsKernel<uint16_t><<<p.n, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace specontext::cuda
