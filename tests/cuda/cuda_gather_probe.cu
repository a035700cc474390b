// A probe for cuda_gather_bench --section footprint: the elastic gather's access pattern (256-byte rows, 16
// bytes per thread, kUnroll loads in flight per thread) with the grid size as a parameter, to see whether more
// reads in flight hide the cost of rows scattered over many 4 KiB host pages. Not the production kernel
// (core/cuda/kernels/elastic_gather.cu keeps its grid small so the compute stream keeps the SMs).
#include <cuda_runtime.h>

#include <cstdint>

namespace specontext::footprint {
namespace {

constexpr int kThreads = 256, kUnroll = 8, kChunks = 16;  // 16 x 16 B = one 256-byte row

__global__ void __launch_bounds__(kThreads) ProbeGather(const uint4* const* rows, int64_t n_rows, uint4* dst) {
  const int64_t n_items = n_rows * kChunks;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x; base < n_items;
       base += step * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t item = base + int64_t(u) * blockDim.x;
      if (item < n_items) v[u] = rows[item / kChunks][item % kChunks];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t item = base + int64_t(u) * blockDim.x;
      if (item < n_items) dst[item] = v[u];
    }
  }
}

}  // namespace

// Copies rows[i] (device-readable addresses of 256-byte rows) to dst[i]; seconds of the kernel (events).
double ProbeGatherSeconds(const void* const* rows, int64_t n_rows, void* dst, int blocks) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  ProbeGather<<<blocks, kThreads>>>(reinterpret_cast<const uint4* const*>(rows), n_rows, static_cast<uint4*>(dst));
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return cudaGetLastError() == cudaSuccess ? ms / 1e3 : -1;
}

}  // namespace specontext::footprint
