// Per-sequence KV tiers (DESIGN.md §1 part 3): layers [0, gpu_layers) keep their full KV on the device;
// layers [gpu_layers, L) keep it in host memory plus a device slot buffer of `budget` rows per KV head
// (SequenceKv in core/backend.h describes the layout and aliasing).
//
// The host copies come from SequenceKv::host_allocator when set (the services' kvstore blocks,
// generator/kvstore_host_tier.h), else from Backend::AllocPinnedHost.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/io/model_config.h"

namespace specontext {

/// KV of one sequence of up to `capacity` tokens with layers >= gpu_layers offloaded.
/// Device tensors: kKvCache (full KV [n_kv, device_rows, head_dim] of the resident layers; device_rows 0 or
/// >= capacity: capacity), kPrefetch (slot buffers [n_kv, budget, head_dim]); host: kKvCache, capacity rows,
/// plain ([n_kv, capacity, head_dim] K and V) or, where the backend asks for it and the memory is this process's
/// pinned memory, one interleaved [n_kv, capacity, 2, head_dim] pair (SequenceKv "Host layout"). Resident layers
/// holding fewer rows than the capacity grow with GrowDeviceKv.
/// `host` (may be null) becomes kv->host_allocator; when null, the innermost ScopedHostKvAllocator of this
/// thread (if any) is used instead.
absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateTieredKv(Backend& backend, const ModelConfig& config,
                                                             int32_t capacity, int32_t gpu_layers, int32_t budget,
                                                             std::shared_ptr<HostKvAllocator> host = nullptr,
                                                             int32_t device_rows = 0);

/// Device rows a resident layer allocates to hold `needed` tokens: `needed` rounded up to a multiple of
/// `grow_rows`, at most `capacity` (grow_rows <= 0: the whole capacity at once). Rounding up bounds how
/// often a growing sequence re-homes its KV (every grow_rows tokens) and how much it holds unused.
int32_t DeviceRowsFor(int32_t needed, int32_t capacity, int32_t grow_rows);

/// Rows of the resident layers of `kv` (they grow together), 0 when every layer is offloaded.
int32_t DeviceRowsOf(const SequenceKv& kv);

/// Grows every resident layer of `kv` that holds fewer than `rows` rows (<= capacity) to exactly `rows`:
/// allocates [n_kv, rows, head_dim], copies the old rows (Backend::CopyHeadRows), frees the old tensors.
/// One layer at a time, so the extra device memory is one layer's KV. On error the layers already grown
/// keep their new tensors (every layer stays valid).
absl::Status GrowDeviceKv(Backend& backend, SequenceKv* kv, int32_t rows);

/// Grows a [heads, R, d] tensor to [heads, rows, d] (rows > R) in `kind` memory keeping its first R rows
/// (the retrieval head's per-sequence K cache grows with the KV). No-op when it already has `rows` rows.
absl::Status GrowHeadRows(Backend& backend, Tensor* t, int64_t rows, MemoryKind kind);

/// Moves `layer` of one sequence to host: copies its device KV (every row it holds; rows past the sequence
/// are don't-care) into a new host tier of `capacity` rows (kv->host_allocator, else pinned; interleaved as
/// AllocateTieredKv's), allocates
/// the slot buffers, then drops the device KV so its memory is freed. The slot buffers start empty: the
/// caller fills them (FullReloadCopies) before the layer's next sparse attention. No-op when the layer is
/// already offloaded.
absl::Status MoveLayerToHost(Backend& backend, SequenceKv* kv, int layer, int32_t budget);

/// Moves offloaded `layer` of one sequence back to the device: allocates its device KV of `rows` rows (the
/// rows of the sequence's resident layers; >= the tokens it holds), copies host rows [0, rows) up, then
/// drops the host copies and slot buffers (pinned memory back to its allocator once the copy is done).
/// No-op when the layer is resident. On error the layer stays offloaded and intact.
absl::Status MoveLayerToDevice(Backend& backend, SequenceKv* kv, int layer, int32_t rows);

/// Re-homes the host copies of every offloaded layer of `kv` into plain tensors from `host` (which becomes
/// kv->host_allocator; an interleaved tier is split into K and V), keeping rows [0, rows) of each KV head (the tokens the sequence holds; 0 for a
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

/// Layers [first, first + layers) of a host layer group (SequenceKv "Host layout").
struct HostLayerGroup {
  int32_t first = 0;
  int32_t layers = 1;
};

/// The host layer group of `layer` of a model of `n_layers` with groups of `group` layers: counted from the
/// last layer ([L - G, L), [L - 2G, L - G), ...; the first group is shorter when G does not divide L), since
/// layers go to host from the last one backward and a group's allocation then serves all of its layers.
HostLayerGroup HostLayerGroupOf(int32_t n_layers, int32_t group, int32_t layer);

/// The bytes of each host allocation a sequence of `capacity` tokens holds once layers [gpu_layers, L) are
/// offloaded, as AllocateTieredKv / MoveLayerToHost make them with an allocator that takes interleaved tiers
/// on backend `b` (plain: K and V per layer; interleaved: one per layer or per layer group). For reserving
/// pinned blocks ahead of the layer moves.
std::vector<int64_t> HostAllocationBytes(const Backend& b, const ModelConfig& config, int32_t capacity,
                                         int32_t gpu_layers);

/// Layers of `kv` whose full KV is on the device (the first offloaded layer's index, or n_layers).
int32_t GpuLayersOf(const SequenceKv& kv);

}  // namespace specontext
