#include "core/cuda/cuda_memory.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_check.h"

namespace specontext::cuda {
namespace {

// 256-byte granularity keeps every tensor aligned for 16-byte vector accesses and cp.async.
constexpr int64_t kAlign = 256;

int64_t RoundUp(int64_t bytes) { return std::max<int64_t>(kAlign, (bytes + kAlign - 1) / kAlign * kAlign); }

}  // namespace

struct CudaMemory::Pool {
  std::shared_ptr<CudaMemory> memory;
  std::mutex mu;
  std::map<int64_t, std::set<void*>> free;     // rounded size -> free blocks
  std::vector<std::pair<void*, int64_t>> owned;  // every block, for the release
  ~Pool() {
    for (auto& [p, bytes] : owned) memory->Release(p, bytes, MemoryKind::kGraphs);
  }
};

std::shared_ptr<CudaMemory::Pool> CudaMemory::NewPool() {
  auto pool = std::make_shared<Pool>();
  pool->memory = shared_from_this();
  return pool;
}

void CudaMemory::SetActivePool(std::shared_ptr<Pool> pool) {
  std::lock_guard<std::mutex> lock(mu_);
  active_pool_ = std::move(pool);
}

CudaMemory::~CudaMemory() { TrimWorkspaceCache(); }

bool CudaMemory::Reserve(int64_t bytes) {
  const int64_t total = total_.fetch_add(bytes) + bytes;
  if (limit_ > 0 && total > limit_) {
    total_.fetch_sub(bytes);
    return false;
  }
  int64_t peak = peak_.load();
  while (total > peak && !peak_.compare_exchange_weak(peak, total)) {
  }
  return true;
}

void CudaMemory::Unreserve(int64_t bytes) { total_.fetch_sub(bytes); }

absl::StatusOr<void*> CudaMemory::RawAlloc(int64_t bytes, MemoryKind kind) {
  if (kind == MemoryKind::kWorkspace) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = ws_cache_.find(bytes);
    if (it != ws_cache_.end() && !it->second.empty()) {
      void* p = *it->second.begin();
      it->second.erase(it->second.begin());
      return p;  // already counted as workspace
    }
  }
  if (!Reserve(bytes)) {
    // Cached workspace is the one thing that can be given back without the caller's help.
    TrimWorkspaceCache();
    if (!Reserve(bytes)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "GPU memory limit ", limit_, " bytes exceeded: ", std::string(MemoryKindName(kind)),
          " allocation of ", bytes, " bytes with ", total_.load(), " bytes in use"));
    }
  }
  cudaSetDevice(device_);
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, static_cast<size_t>(bytes));
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of the runtime
    TrimWorkspaceCache();
    err = cudaMalloc(&p, static_cast<size_t>(bytes));
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    Unreserve(bytes);
    return absl::ResourceExhaustedError(absl::StrCat("cudaMalloc of ", bytes, " bytes (",
                                                     std::string(MemoryKindName(kind)),
                                                     ") failed: ", cudaGetErrorString(err)));
  }
  bytes_[static_cast<size_t>(kind)].fetch_add(bytes);
  return p;
}

void CudaMemory::Release(void* p, int64_t bytes, MemoryKind kind) {
  if (kind == MemoryKind::kWorkspace) {
    std::lock_guard<std::mutex> lock(mu_);
    ws_cache_[bytes].insert(p);
    return;
  }
  cudaSetDevice(device_);
  cudaFree(p);  // errors at process exit (context gone) are harmless here
  bytes_[static_cast<size_t>(kind)].fetch_sub(bytes);
  Unreserve(bytes);
}

void CudaMemory::TrimWorkspaceCache() {
  std::map<int64_t, std::set<void*>> cache;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cache.swap(ws_cache_);
  }
  if (cache.empty()) return;
  cudaSetDevice(device_);
  for (auto& [bytes, blocks] : cache) {
    for (void* p : blocks) {
      cudaFree(p);
      bytes_[static_cast<size_t>(MemoryKind::kWorkspace)].fetch_sub(bytes);
      Unreserve(bytes);
    }
  }
}

absl::StatusOr<Tensor> CudaMemory::Alloc(DType dtype, Shape shape, MemoryKind kind) {
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("negative dimension in ", ShapeToString(shape)));
  }
  if (kind == MemoryKind::kCount) return absl::InvalidArgumentError("Alloc: kCount is not a memory kind");
  const int64_t bytes = RoundUp(NumElements(shape) * static_cast<int64_t>(DTypeSize(dtype)));
  std::shared_ptr<Pool> pool;
  if (kind == MemoryKind::kWorkspace) {
    std::lock_guard<std::mutex> lock(mu_);
    pool = active_pool_;
  }
  if (pool != nullptr) {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(pool->mu);
      auto it = pool->free.find(bytes);
      if (it != pool->free.end() && !it->second.empty()) {
        p = *it->second.begin();
        it->second.erase(it->second.begin());
      }
    }
    if (p == nullptr) {
      auto p_or = RawAlloc(bytes, MemoryKind::kGraphs);
      if (!p_or.ok()) return p_or.status();
      p = *p_or;
      std::lock_guard<std::mutex> lock(pool->mu);
      pool->owned.emplace_back(p, bytes);
    }
    std::shared_ptr<void> storage(p, [pool, bytes](void* q) {
      std::lock_guard<std::mutex> lock(pool->mu);
      pool->free[bytes].insert(q);
    });
    return Tensor(p, dtype, std::move(shape), DeviceKind::kCuda, std::move(storage));
  }
  auto p_or = RawAlloc(bytes, kind);
  if (!p_or.ok()) return p_or.status();
  void* p = *p_or;
  std::shared_ptr<CudaMemory> self = shared_from_this();
  std::shared_ptr<void> storage(p, [self, kind, bytes](void* q) { self->Release(q, bytes, kind); });
  return Tensor(p, dtype, std::move(shape), DeviceKind::kCuda, std::move(storage));
}

MemoryReport CudaMemory::Report() const {
  MemoryReport r;
  for (size_t i = 0; i < r.bytes.size(); ++i) r.bytes[i] = bytes_[i].load();
  r.total = total_.load();
  r.peak = peak_.load();
  r.limit = limit_;
  return r;
}

int64_t CudaMemory::Available() const {
  size_t free_bytes = 0, total_bytes = 0;
  cudaSetDevice(device_);
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    cudaGetLastError();
    free_bytes = 0;
  }
  int64_t avail = static_cast<int64_t>(free_bytes);
  if (limit_ > 0) avail = std::min(avail, std::max<int64_t>(0, limit_ - total_.load()));
  return avail;
}

}  // namespace specontext::cuda
