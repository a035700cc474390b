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
#include <string>
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

// ---- pinned, device-mapped host memory (the host KV tier) ----------------------------------------
//
// The elastic gather (kernels/elastic_gather.cu) reads 256-512-byte rows of the host KV tier straight over
// PCIe, each row of a step in a different 4 KiB page. How those pages are obtained decides what the GPU
// (and an IOMMU) must translate per row: 4 KiB driver pages (cudaHostAlloc) or 2 MiB pages registered with
// cudaHostRegister. tests/cuda/cuda_gather_bench.cc (--section footprint) measures the modes. On the H100 VM
// (2026-11-24) every mode gathers at the same rate (~23 GB/s with one row per 32 KiB, ~42-46 GB/s with 4+
// rows per 4 KiB page or a head's rows within 2 MiB), so AllocPinnedHost keeps cudaHostAlloc; only pinning
// itself was faster with thp (1.8-4.4 GB/s against 1.3-2.1 for cudaHostAlloc: the startup of the host tier).

enum class HostPinMode {
  kCudaHostAlloc,    // cudaHostAlloc(mapped | portable): the driver's own (4 KiB) pages
  kRegister4K,       // anonymous mmap kept on 4 KiB pages (MADV_NOHUGEPAGE) + cudaHostRegister(mapped | portable)
  kTransparentHuge,  // 2 MiB-aligned anonymous mmap + MADV_HUGEPAGE, faulted in, + cudaHostRegister
  kHugeTlb,          // mmap(MAP_HUGETLB, 2 MiB) from the hugetlbfs pool + cudaHostRegister
};
const char* HostPinModeName(HostPinMode mode);  // "hostalloc", "register4k", "thp", "hugetlb"
bool ParseHostPinMode(const std::string& name, HostPinMode* mode);

// One block of page-locked host memory mapped for the device; with unified addressing the device
// pointer equals `ptr`, so one pointer serves host code and kernels (checked at allocation).
struct MappedHostBlock {
  void* ptr = nullptr;
  size_t bytes = 0;      // asked for
  size_t mapped = 0;     // mapped and pinned: `bytes` rounded up to the mode's page size
  HostPinMode mode = HostPinMode::kCudaHostAlloc;
};

// Allocates `bytes` (> 0) with exactly `mode` on `device`. Unavailable when the mode cannot be had here
// (no hugetlbfs pages, THP set to "never"), ResourceExhausted when pinning fails. Contents unspecified.
absl::StatusOr<MappedHostBlock> AllocMappedHost(int device, size_t bytes, HostPinMode mode);
// `preferred`, else the next mode of hugetlb -> thp -> hostalloc that works (register4k falls back to
// hostalloc); the first fallback of the process logs one WARNING with the reason.
absl::StatusOr<MappedHostBlock> AllocMappedHostOrFallback(int device, size_t bytes, HostPinMode preferred);
// Unpins and releases a block of AllocMappedHost; the caller ensures no kernel still uses it.
void FreeMappedHost(const MappedHostBlock& block);

// Bytes of [ptr, ptr + bytes) the kernel backs with huge pages (THP or hugetlb), from /proc/self/smaps;
// VMAs partly inside the range count in full. -1 when smaps cannot be read.
int64_t HugePageBytes(const void* ptr, size_t bytes);

}  // namespace specontext::cuda
