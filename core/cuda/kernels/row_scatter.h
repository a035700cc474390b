// Row scatter (Backend::ScatterRows): rows of a [n, heads, d] source written into per-segment
// destinations [heads, capacity, d] at given positions (retrieval head K caches, per-sequence row pools).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace specontext::cuda {

// One segment: source rows [row_begin, row_begin + n_rows) -> dst positions [pos, pos + n_rows).
struct ScatterSegment {
  void* dst = nullptr;   // [heads, capacity, row_bytes]
  int64_t capacity = 0;
  int32_t row_begin = 0;
  int32_t n_rows = 0;
  int32_t pos = 0;
  int32_t pad = 0;
};

struct RowScatterParams {
  const void* src = nullptr;                // [n, heads, row_bytes]
  const ScatterSegment* segments = nullptr; // [n_segments], device memory
  int n_segments = 0;
  int max_rows = 0;                         // largest n_rows of a segment (grid size)
  int heads = 0;
  int64_t row_bytes = 0;
  int access_bytes = 1;                     // 16, 4, 2 or 1: divides row_bytes and every src/dst address
};
// The host has checked every bound; the kernel trusts the table.
cudaError_t LaunchRowScatter(const RowScatterParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
