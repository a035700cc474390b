#include "core/model/pinned_host_cache.h"

#include <algorithm>
#include <bit>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {

int64_t PinnedHostCache::SizeClass(int64_t bytes) {
  constexpr int64_t kMin = int64_t{2} << 20;
  const int64_t b = std::max<int64_t>(bytes, 1);
  const int64_t step = std::max<int64_t>(kMin, static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(b))) / 8);
  return (b + step - 1) / step * step;
}

absl::StatusOr<Tensor> PinnedHostCache::Pin(Backend& b, int64_t size_class) {
  absl::StatusOr<Tensor> block = b.AllocPinnedHost(DType::kU8, {size_class}, MemoryKind::kKvCache);
  if (!block.ok() && free_bytes() > 0) {
    Trim();  // cached blocks of other sizes may be what stands in the way
    block = b.AllocPinnedHost(DType::kU8, {size_class}, MemoryKind::kKvCache);
  }
  return block;
}

absl::StatusOr<Tensor> PinnedHostCache::Alloc(Backend& b, DType dtype, const Shape& shape) {
  const int64_t bytes = NumElements(shape) * static_cast<int64_t>(DTypeSize(dtype));
  const int64_t cls = SizeClass(bytes);
  Tensor block;
  {
    absl::MutexLock lock(&mu_);
    auto it = free_.find(cls);
    if (it != free_.end() && !it->second.empty()) {
      block = std::move(it->second.back());
      it->second.pop_back();
      free_bytes_ -= cls;
    }
  }
  if (block.empty()) {
    ASSIGN_OR_RETURN(block, Pin(b, cls));
  }
  // The tensor's storage owns the block; when the last view goes the block returns to the cache (or is
  // unpinned with it, if the cache is gone).
  std::weak_ptr<PinnedHostCache> self = weak_from_this();
  void* data = block.data();
  const DeviceKind device = block.device();
  auto holder = std::make_shared<Tensor>(std::move(block));
  std::shared_ptr<void> storage(data, [self, holder](void*) {
    if (std::shared_ptr<PinnedHostCache> cache = self.lock()) cache->GiveBack(std::move(*holder));
  });
  return Tensor(data, dtype, shape, device, std::move(storage));
}

void PinnedHostCache::GiveBack(Tensor block) {
  const int64_t cls = block.numel();
  absl::MutexLock lock(&mu_);
  free_[cls].push_back(std::move(block));
  free_bytes_ += cls;
}

absl::Status PinnedHostCache::Reserve(Backend& b, int64_t bytes, int64_t count) {
  if (bytes <= 0 || count < 0) {
    return absl::InvalidArgumentError(absl::StrCat("pinned host cache: reserve ", count, " blocks of ", bytes, " bytes"));
  }
  const int64_t cls = SizeClass(bytes);
  for (int64_t i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(Tensor block, b.AllocPinnedHost(DType::kU8, {cls}, MemoryKind::kKvCache));
    GiveBack(std::move(block));
  }
  return absl::OkStatus();
}

void PinnedHostCache::Trim() {
  absl::flat_hash_map<int64_t, std::vector<Tensor>> drop;
  {
    absl::MutexLock lock(&mu_);
    drop.swap(free_);
    free_bytes_ = 0;
  }
  // `drop` unpins the blocks here, outside the lock.
}

int64_t PinnedHostCache::free_bytes() const {
  absl::MutexLock lock(&mu_);
  return free_bytes_;
}

}  // namespace specontext
