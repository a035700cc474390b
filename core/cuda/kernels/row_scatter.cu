// Row scatter: grid.y = segment, grid.x strides over (row, head) pairs of the segment; a block copies
// one row of `row_bytes` with the widest access the alignment allows.
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/row_scatter.h"

namespace specontext::cuda {
namespace {

template <typename VecT>
__global__ void RowScatterKernel(RowScatterParams p) {
  const ScatterSegment g = p.segments[blockIdx.y];
  const int64_t n_vec = p.row_bytes / sizeof(VecT);
  for (int64_t item = blockIdx.x; item < int64_t(g.n_rows) * p.heads; item += gridDim.x) {
    const int64_t r = item / p.heads, h = item % p.heads;
    const VecT* src = reinterpret_cast<const VecT*>(static_cast<const char*>(p.src) +
                                                    ((g.row_begin + r) * p.heads + h) * p.row_bytes);
    VecT* dst = reinterpret_cast<VecT*>(static_cast<char*>(g.dst) + (h * g.capacity + g.pos + r) * p.row_bytes);
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) dst[j] = src[j];
  }
}

}  // namespace

cudaError_t LaunchRowScatter(const RowScatterParams& p, cudaStream_t stream) {
  if (p.n_segments == 0 || p.max_rows == 0 || p.heads == 0) return cudaSuccess;
  const int64_t items = int64_t(p.max_rows) * p.heads;
  const int threads = p.row_bytes >= 1024 ? 128 : 64;
  // grid.y is limited to 65535 segments per launch.
  for (int first = 0; first < p.n_segments; first += 65535) {
    RowScatterParams q = p;
    q.segments = p.segments + first;
    q.n_segments = p.n_segments - first < 65535 ? p.n_segments - first : 65535;
    const dim3 grid(static_cast<unsigned>(items < 1024 ? items : 1024), static_cast<unsigned>(q.n_segments));
    switch (p.access_bytes) {
      case 16: RowScatterKernel<uint4><<<grid, threads, 0, stream>>>(q); break;
      case 4: RowScatterKernel<uint32_t><<<grid, threads, 0, stream>>>(q); break;
      case 2: RowScatterKernel<uint16_t><<<grid, threads, 0, stream>>>(q); break;
      default: RowScatterKernel<uint8_t><<<grid, threads, 0, stream>>>(q); break;
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace specontext::cuda
