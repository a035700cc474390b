#include "core/cpu/cpu_memory.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace specontext {

absl::StatusOr<Tensor> CpuMemory::Alloc(DType dtype, Shape shape, MemoryKind kind) {
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("negative dimension in ", ShapeToString(shape)));
  }
  const int64_t bytes = NumElements(shape) * static_cast<int64_t>(DTypeSize(dtype));
  const int64_t rounded = std::max<int64_t>(64, (bytes + 63) / 64 * 64);
  const int64_t total = total_.fetch_add(rounded) + rounded;
  if (limit_ > 0 && total > limit_) {
    total_.fetch_sub(rounded);
    return absl::ResourceExhaustedError(absl::StrCat(
        "memory limit ", limit_, " bytes exceeded: ", std::string(MemoryKindName(kind)),
        " allocation of ", bytes, " bytes with ", total - rounded, " in use"));
  }
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr) {
    total_.fetch_sub(rounded);
    return absl::ResourceExhaustedError(absl::StrCat("out of host memory allocating ", bytes, " bytes"));
  }
  const int64_t kind_bytes = bytes_[static_cast<size_t>(kind)].fetch_add(rounded) + rounded;
  int64_t peak = peak_.load();
  while (total > peak && !peak_.compare_exchange_weak(peak, total)) {
  }
  std::atomic<int64_t>& kind_peak = peak_bytes_[static_cast<size_t>(kind)];
  int64_t kp = kind_peak.load();
  while (kind_bytes > kp && !kind_peak.compare_exchange_weak(kp, kind_bytes)) {
  }
  std::shared_ptr<CpuMemory> self = shared_from_this();
  std::shared_ptr<void> storage(p, [self, kind, rounded](void* q) {
    std::free(q);
    self->Release(kind, rounded);
  });
  return Tensor(p, dtype, std::move(shape), DeviceKind::kCpu, std::move(storage));
}

void CpuMemory::Release(MemoryKind kind, int64_t bytes) {
  bytes_[static_cast<size_t>(kind)].fetch_sub(bytes);
  total_.fetch_sub(bytes);
}

MemoryReport CpuMemory::Report() const {
  MemoryReport r;
  for (size_t i = 0; i < r.bytes.size(); ++i) r.bytes[i] = bytes_[i].load();
  r.total = total_.load();
  r.peak = peak_.load();
  for (size_t i = 0; i < r.peak_bytes.size(); ++i) r.peak_bytes[i] = peak_bytes_[i].load();
  r.limit = limit_;
  return r;
}

}  // namespace specontext
