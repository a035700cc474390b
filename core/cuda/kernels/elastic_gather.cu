// Elastic loading: gathers K/V rows of offloaded layers from mapped pinned host memory into the GPU slot
// buffers. Rows are 256-512 bytes, far too small for one cudaMemcpy each, so one kernel moves them all:
// every thread owns 16-byte pieces of rows (consecutive threads, consecutive pieces of one row, so a warp
// reads whole rows in 128-byte PCIe requests) and keeps kUnroll loads in flight before storing, which is
// what hides the ~1-2 us latency of reads across PCIe. The grid is small on purpose: the gather runs on the
// copy stream beside the decode's compute, and blocks stalled on PCIe reads hold their SM's thread slots, so a
// grid filling every SM (as before 2026-11-24 08:00) serialised the compute behind the copies (R 32, S 32K:
// a 58 ms forward for 40 ms of copies and ~15 ms of compute on the H100). kMaxBlocks x kThreads x kUnroll
// x 16 B = 1 MiB in flight is far above PCIe's bandwidth-delay product (~50 GB/s x a few us).
#include <algorithm>

#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/sparse_kernels.h"

namespace specontext::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 8;
constexpr int kMaxBlocks = 32;

struct Piece {
  const uint4* src;
  uint4* dst;
};

__device__ __forceinline__ Piece Locate(const ElasticGatherParams& p, int64_t item, int chunks, int heads_cov) {
  const int c = static_cast<int>(item % chunks);
  int64_t r = item / chunks;
  const int is_v = static_cast<int>(r & 1);
  r >>= 1;
  const int layer = static_cast<int>(r % p.n_layers);
  r /= p.n_layers;
  const int hi = static_cast<int>(r % heads_cov);
  const int64_t copy = r / heads_cov;
  const ElasticCopy cp = p.copies[copy];
  const int seq = cp.set / p.sets_per_seq;
  const int head = heads_cov == 1 ? cp.set % p.sets_per_seq : hi;
  const ElasticSeqPtrs s = p.seqs[int64_t(layer) * p.n_seqs + seq];
  const char* src = static_cast<const char*>(is_v ? s.host_v : s.host_k) +
                    (int64_t(head) * s.capacity + cp.token) * s.host_row_pitch;
  char* dst = static_cast<char*>(is_v ? s.slot_v : s.slot_k) + (int64_t(head) * s.slots + cp.slot) * p.row_bytes;
  return {reinterpret_cast<const uint4*>(src) + c, reinterpret_cast<uint4*>(dst) + c};
}

__global__ void __launch_bounds__(kThreads) ElasticGatherKernel(ElasticGatherParams p, int64_t n_items, int chunks,
                                                                 int heads_cov) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x; base < n_items;
       base += step * kUnroll) {
    Piece pc[kUnroll];
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t item = base + int64_t(u) * blockDim.x;
      if (item < n_items) {
        pc[u] = Locate(p, item, chunks, heads_cov);
        v[u] = *pc[u].src;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t item = base + int64_t(u) * blockDim.x;
      if (item < n_items) *pc[u].dst = v[u];
    }
  }
}

}  // namespace

cudaError_t LaunchElasticGather(const ElasticGatherParams& p, int sm_count, cudaStream_t stream) {
  if (p.n_copies == 0) return cudaSuccess;
  if (p.row_bytes % 16 != 0 || p.row_bytes <= 0 || p.n_kv <= 0 || p.sets_per_seq <= 0 || p.n_layers <= 0 ||
      (p.n_layers > 1 && p.n_seqs <= 0)) {
    return cudaErrorInvalidValue;
  }
  const int chunks = static_cast<int>(p.row_bytes / 16);
  const int heads_cov = p.sets_per_seq == 1 ? p.n_kv : 1;
  const int64_t n_items = p.n_copies * heads_cov * p.n_layers * 2 * chunks;
  const int64_t per_block = int64_t(kThreads) * kUnroll;
  // Few blocks, each with many reads in flight (see the top of the file); a block loops over several groups
  // when the list is long.
  const int64_t blocks = std::min<int64_t>((n_items + per_block - 1) / per_block, std::min(sm_count, kMaxBlocks));
  ElasticGatherKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, n_items, chunks, heads_cov);
  return cudaGetLastError();
}

}  // namespace specontext::cuda
