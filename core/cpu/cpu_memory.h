// Host allocations with per-kind accounting and an optional limit, shared by the CPU backend and
// its tensors (the accounting outlives the backend while tensors are alive).
#pragma once

#include <atomic>
#include <memory>

#include "absl/status/statusor.h"
#include "core/backend.h"

namespace specontext {

class CpuMemory : public std::enable_shared_from_this<CpuMemory> {
 public:
  explicit CpuMemory(int64_t limit) : limit_(limit) {}
  absl::StatusOr<Tensor> Alloc(DType dtype, Shape shape, MemoryKind kind);
  MemoryReport Report() const;
  int64_t limit() const { return limit_; }

 private:
  void Release(MemoryKind kind, int64_t bytes);

  const int64_t limit_;
  std::atomic<int64_t> bytes_[static_cast<size_t>(MemoryKind::kCount)] = {};
  std::atomic<int64_t> total_{0};
  std::atomic<int64_t> peak_{0};
  std::atomic<int64_t> peak_bytes_[static_cast<size_t>(MemoryKind::kCount)] = {};
};

}  // namespace specontext
