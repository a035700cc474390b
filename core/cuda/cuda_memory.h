// Device memory with per-kind accounting and a hard limit (--gpu-memory-limit).
//
// Every byte handed out is counted under its MemoryKind; an allocation that would take the total
// past the limit fails with ResourceExhausted before cudaMalloc is called. Workspace blocks
// (MemoryKind::kWorkspace) are cached by size; an allocation takes the lowest-addressed free block
// of its size. The choice depends only on the set of free blocks, not on the order they were freed
// in, so once a forward pass has run (warm-up), repeating the same sequence of workspace
// allocations and frees gets the same addresses every time (what CUDA graph replay needs). Cached
// workspace bytes stay counted as workspace: they occupy the GPU.
//
// Frees are not stream-ordered: releasing a non-workspace block calls cudaFree, which waits for the
// device. Workspace blocks go back to the cache; reuse is safe because all ops run on one stream.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"

namespace specontext::cuda {

class CudaMemory : public std::enable_shared_from_this<CudaMemory> {
 public:
  CudaMemory(int device, int64_t limit) : device_(device), limit_(limit) {}
  ~CudaMemory();
  CudaMemory(const CudaMemory&) = delete;
  CudaMemory& operator=(const CudaMemory&) = delete;

  // An uninitialised device tensor of `dtype`/`shape`, accounted under `kind`.
  absl::StatusOr<Tensor> Alloc(DType dtype, Shape shape, MemoryKind kind);
  MemoryReport Report() const;
  // Bytes that may still be allocated: limit minus total, bounded by the device's free memory.
  int64_t Available() const;
  // Returns cached (unused) workspace blocks to the device.
  void TrimWorkspaceCache();
  int64_t limit() const { return limit_; }
  int device() const { return device_; }

  // Graph pools (CUDA graphs, cuda_graph.cc): while a pool is active, workspace allocations come
  // from it instead of the shared cache and are accounted as MemoryKind::kGraphs. Its blocks return
  // to the pool when freed, never to the cache, so a captured graph's temporaries cannot be handed
  // to anything else; the pool gives its memory back when the last reference (graph or tensor) goes.
  struct Pool;
  std::shared_ptr<Pool> NewPool();
  void SetActivePool(std::shared_ptr<Pool> pool);  // null: none

 private:
  absl::StatusOr<void*> RawAlloc(int64_t bytes, MemoryKind kind);
  void Release(void* p, int64_t bytes, MemoryKind kind);
  bool Reserve(int64_t bytes);  // false when past the limit
  void Unreserve(int64_t bytes);

  const int device_;
  const int64_t limit_;
  std::mutex mu_;  // guards ws_cache_
  std::map<int64_t, std::set<void*>> ws_cache_;  // rounded size -> free blocks
  std::atomic<int64_t> bytes_[static_cast<size_t>(MemoryKind::kCount)] = {};
  std::shared_ptr<Pool> active_pool_;  // guarded by mu_
  std::atomic<int64_t> total_{0};
  std::atomic<int64_t> peak_{0};
};

}  // namespace specontext::cuda
