// Per-sequence KV tiers (DESIGN.md §1 part 3): layers [0, gpu_layers) keep their full KV on the device;
// layers [gpu_layers, L) keep it in host memory plus a device slot buffer of `budget` rows per KV head
// (SequenceKv in core/backend.h describes the layout and aliasing).
//
// The host copies come from SequenceKv::host_allocator when set (the services' kvstore blocks,
// generator/kvstore_host_tier.h), else from Backend::AllocPinnedHost.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/io/model_config.h"

namespace specontext {

/// KV of one sequence of up to `capacity` tokens with layers >= gpu_layers offloaded.
/// Device tensors: kKvCache (full KV), kPrefetch (slot buffers [n_kv, budget, head_dim]); host: kKvCache.
/// `host` (may be null) becomes kv->host_allocator; when null, the innermost ScopedHostKvAllocator of this
/// thread (if any) is used instead.
absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateTieredKv(Backend& backend, const ModelConfig& config,
                                                             int32_t capacity, int32_t gpu_layers, int32_t budget,
                                                             std::shared_ptr<HostKvAllocator> host = nullptr);

/// Moves `layer` of one sequence to host: copies its full KV (all `capacity` rows; rows past the sequence
/// are don't-care) into new host tensors (kv->host_allocator, else pinned), allocates the slot buffers, then
/// drops the device KV so its memory is freed. The slot buffers start empty: the caller fills them
/// (FullReloadCopies) before the layer's next sparse attention. No-op when the layer is already offloaded.
absl::Status MoveLayerToHost(Backend& backend, SequenceKv* kv, int layer, int32_t budget);

/// Re-homes the host copies of every offloaded layer of `kv` into tensors from `host` (which becomes
/// kv->host_allocator), keeping rows [0, rows) of each KV head (the tokens the sequence holds; 0 for a
/// sequence that was just allocated). For code that allocated `kv` without an allocator (a decorator around
/// a SparseDecodeHooks). Waits for the backend (Synchronize) before copying. On error `kv` is unchanged.
absl::Status AdoptHostTier(Backend& backend, SequenceKv* kv, std::shared_ptr<HostKvAllocator> host, int32_t rows);

/// While alive, AllocateTieredKv calls of this thread that get no allocator use `host` (scopes nest). Lets a
/// SparseDecodeHooks decorator choose where the host tier of a sequence it admits lives without the decoder
/// knowing about it.
class ScopedHostKvAllocator {
 public:
  explicit ScopedHostKvAllocator(std::shared_ptr<HostKvAllocator> host);
  ~ScopedHostKvAllocator();
  ScopedHostKvAllocator(const ScopedHostKvAllocator&) = delete;
  ScopedHostKvAllocator& operator=(const ScopedHostKvAllocator&) = delete;
  /// The innermost scope's allocator on this thread (null outside any scope).
  static std::shared_ptr<HostKvAllocator> Current();

 private:
  std::shared_ptr<HostKvAllocator> host_;
  ScopedHostKvAllocator* outer_;
};

/// Layers of `kv` whose full KV is on the device (the first offloaded layer's index, or n_layers).
int32_t GpuLayersOf(const SequenceKv& kv);

}  // namespace specontext
