// Pinned host blocks kept for reuse by the host KV tier (core/model/kv_tiers.h). Pinning host memory is slow
// (cudaHostAlloc of a 32-sequence 8B layer, 4.5 GB, took ~3 s on the H100 machine, 2026-11-24: 65 s of
// layer moves in one [2K, 32K] benchmark run), and every layer move and every new request of a server would
// pay it again. A layer moved to host takes a free block of its size class; when its tensor goes (the
// sequence finished) the block goes back to the free list instead of being unpinned. Reserve() pins blocks
// ahead (a server's start, a benchmark's setup) so that moves during generation pin nothing.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/backend.h"

namespace specontext {

class PinnedHostCache : public HostKvAllocator, public std::enable_shared_from_this<PinnedHostCache> {
 public:
  static std::shared_ptr<PinnedHostCache> Create() { return std::shared_ptr<PinnedHostCache>(new PinnedHostCache()); }

  /// A tensor over a cached block of the size class of its bytes, or a newly pinned block
  /// (Backend::AllocPinnedHost, accounted as kKvCache host bytes while pinned, cached or not). When pinning
  /// fails the free blocks are unpinned and it is tried once more.
  absl::StatusOr<Tensor> Alloc(Backend& backend, DType dtype, const Shape& shape) override;
  /// Its blocks are AllocPinnedHost memory of this process: host tiers may be interleaved.
  bool interleaved_ok() const override { return true; }
  /// Pins `count` more free blocks for tensors of `bytes` bytes. On error the blocks pinned so far stay cached.
  absl::Status Reserve(Backend& backend, int64_t bytes, int64_t count);
  /// Unpins every free block.
  void Trim();
  /// Bytes of the free blocks.
  int64_t free_bytes() const;
  /// The size class of a `bytes` block: rounded up to 2 MiB, then to 1/8 of its power of two (so a class
  /// wastes at most 12.5%; tensors of sequences with nearby capacities share blocks).
  static int64_t SizeClass(int64_t bytes);

 private:
  PinnedHostCache() = default;
  absl::StatusOr<Tensor> Pin(Backend& backend, int64_t size_class);
  void GiveBack(Tensor block);

  mutable absl::Mutex mu_;
  absl::flat_hash_map<int64_t, std::vector<Tensor>> free_ ABSL_GUARDED_BY(mu_);  // size class -> blocks
  int64_t free_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace specontext
