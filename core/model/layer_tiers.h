// The layer tiers of a decoder's live sequences (DESIGN.md §1 part 3), shared by the in-process
// (core/model/sparse_decoder.h) and the split (generator/remote_sparse_decoder.h) decoders: how many layers
// keep their full KV on the device, the planner's moves to host as the rows in flight grow and back when
// they fit again, an operator's cap, the layers moved since the last decode step (their slot buffers need a
// full reload) and the counters. Engine thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/sparse/memory_planner.h"

namespace specontext {

/// One live sequence as the tiers see it.
struct TierSeq {
  SequenceKv* kv = nullptr;
  int32_t budget = 0;  // slot rows per KV head of its offloaded layers
  int32_t rows = 0;    // device rows its resident layers hold (the rows a returning layer gets)
  int32_t capacity = 0;  // tokens it may reach (how much more it can grow)
};

/// Counters of LayerTiers (into SparseEngineStats).
struct TierCounters {
  int64_t moves = 0;    // layers moved to host (every sequence at once counts one)
  int64_t returns = 0;  // layers moved back to the device
  double seconds = 0;   // host wall time of both (allocation, copies, frees)
};

class LayerTiers {
 public:
  /// Turns this tier's resident-layer target (or its error) into the one to apply. Tensor parallelism sets it
  /// so that every rank applies the same move at the same step (core/model/sparse_tensor_parallel.h
  /// AgreeOnGpuLayers): each rank's planner sees its own backend, yet all ranks must keep the same layers
  /// offloaded or their forwards diverge. Called by every Plan that has a planner and sequences.
  using Agreement = std::function<absl::StatusOr<int32_t>(const absl::StatusOr<int32_t>& target)>;

  /// `backend` must outlive the tiers. `grow_rows`: the sequences' device KV growth chunk (the margin a
  /// returning layer needs per sequence). Every layer starts resident.
  LayerTiers(Backend* backend, int32_t n_layers, std::optional<MemoryPlanner> planner, int32_t grow_rows);

  int32_t n_layers() const { return n_layers_; }
  int32_t gpu_layers() const { return gpu_layers_; }
  bool any_offloaded() const { return gpu_layers_ < n_layers_; }
  const std::optional<MemoryPlanner>& planner() const { return planner_; }
  const TierCounters& counters() const { return counters_; }

  /// Layer `l` moved to host since the last ClearReloads (its slot buffers must be filled by a full reload).
  bool reload_pending(int32_t l) const { return reload_pending_[l]; }
  bool any_reload_pending() const;
  void ClearReloads();

  /// Plans for `rows` device rows over `seqs` (every live sequence, with the one being admitted counted in
  /// `rows` but possibly not yet in `seqs`): moves layers to host from the last backward when a threshold is
  /// crossed, and the first offloaded layers back when the rows fit again with a margin (an eighth more rows
  /// and each sequence's next growth chunk, so that the next growth does not send them straight back), up to
  /// the cap. ResourceExhausted when even every layer offloaded does not fit. No-op without a planner.
  absl::Status Plan(int64_t rows, int32_t n_seqs, std::span<const TierSeq> seqs);
  /// Sets the agreement Plan applies its target through (null: the target as is).
  void set_agreement(Agreement agreement) { agreement_ = std::move(agreement); }
  /// Moves layers [gpu_layers, L) of `seqs` to host now and caps the resident layers at `gpu_layers` from
  /// then on (operators, tests). InvalidArgument outside [0, L].
  absl::Status Offload(int32_t gpu_layers, std::span<const TierSeq> seqs);

 private:
  // The resident layers Plan aims for (gpu_layers_ when nothing should move); mutates nothing.
  absl::StatusOr<int32_t> Target(int64_t rows, int32_t n_seqs, std::span<const TierSeq> seqs) const;
  absl::Status MoveToHost(int32_t gpu_layers, std::span<const TierSeq> seqs);
  absl::Status MoveToDevice(int32_t gpu_layers, std::span<const TierSeq> seqs);

  Backend* backend_;
  int32_t n_layers_;
  std::optional<MemoryPlanner> planner_;
  int32_t grow_rows_;
  int32_t gpu_layers_;
  int32_t cap_;
  std::vector<bool> reload_pending_;
  TierCounters counters_;
  Agreement agreement_;
};

}  // namespace specontext
