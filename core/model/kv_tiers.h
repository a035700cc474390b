// Per-sequence KV tiers (DESIGN.md §1 part 3): layers [0, gpu_layers) keep their full KV on the device;
// layers [gpu_layers, L) keep it in pinned host memory plus a device slot buffer of `budget` rows per KV
// head (SequenceKv in core/backend.h describes the layout and aliasing).
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/io/model_config.h"

namespace specontext {

/// KV of one sequence of up to `capacity` tokens with layers >= gpu_layers offloaded.
/// Device tensors: kKvCache (full KV), kPrefetch (slot buffers [n_kv, budget, head_dim]); host: kKvCache.
absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateTieredKv(Backend& backend, const ModelConfig& config,
                                                             int32_t capacity, int32_t gpu_layers, int32_t budget);

/// Moves `layer` of one sequence to host: copies its full KV (all `capacity` rows; rows past the sequence
/// are don't-care) into new pinned host tensors, allocates the slot buffers, then drops the device KV so
/// its memory is freed. The slot buffers start empty: the caller fills them (FullReloadCopies) before the
/// layer's next sparse attention. No-op when the layer is already offloaded.
absl::Status MoveLayerToHost(Backend& backend, SequenceKv* kv, int layer, int32_t budget);

/// Layers of `kv` whose full KV is on the device (the first offloaded layer's index, or n_layers).
int32_t GpuLayersOf(const SequenceKv& kv);

}  // namespace specontext
