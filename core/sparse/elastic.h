// Elastic loading (DESIGN.md §1 part 2, §4 step 3): keep the slot buffers of offloaded layers equal to the
// current index sets while copying only the rows that changed.
//
// Every offloaded layer of a sequence has a slot buffer K, V [n_kv_heads, budget, head_dim]. All offloaded
// layers read the same index sets, so one token->slot map per (sequence, set) serves every offloaded layer:
// planning is done once per step and its copy list is executed for each offloaded layer (and a layer moved to
// host later is filled with a full reload in the same slot layout).
//
// Plan first, apply after (STYLE practice 4):
//   1. PlanElasticLoads(maps, sets)   const on the maps; computes the slot of every position of S_now
//                                     (kept tokens keep their slot, S_now \ S_last take free slots: those
//                                     freed by S_last \ S_now or never used) and the copy list.
//   2. ExecuteCopiesCpu(plan.copies, ...) per offloaded layer (CUDA: a gather kernel on the copy stream,
//                                     one event per layer; it must be ordered after the previous step's
//                                     reads of that layer's buffer, because it overwrites freed slots).
//   3. ApplyElasticPlan(plan, sets, maps) commits S_now as the maps' state. A plan whose map changed since
//                                     planning is refused (FailedPrecondition). Planning already wrote the
//                                     new state into each map's back buffers (the data is hot in cache
//                                     there, and planning runs in parallel), so the commit is a swap per set.
// Sparse attention of offloaded layers reads the slot buffers through plan.slots (parallel to
// IndexSets::indices).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/sparse/index_sets.h"
#include "core/tensor.h"

namespace specontext {

struct ElasticPlan;

/// Token->slot map of one sequence: per set, the resident token positions (ascending) and their slots.
class SlotMap {
 public:
  /// `n_sets`: the sequence's sets_per_seq (n_kv_heads or 1); `budget`: slots per buffer.
  SlotMap(int32_t n_sets, int32_t budget);

  int32_t n_sets() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t budget() const { return budget_; }
  /// Bumped by every ApplyElasticPlan / Clear; plans remember it to detect staleness.
  uint64_t generation() const { return generation_; }
  std::span<const int32_t> tokens(int32_t set) const { return tokens_[set]; }
  std::span<const int32_t> slots(int32_t set) const { return slots_[set]; }
  /// Slot holding `token` in `set`, or -1 when it is not resident.
  int32_t SlotOf(int32_t set, int32_t token) const;
  /// Forgets every resident token (the buffers' content becomes meaningless).
  void Clear();

 private:
  friend absl::Status ApplyElasticPlan(const ElasticPlan& plan, const IndexSets& sets,
                                       std::span<SlotMap* const> maps);
  friend absl::Status PlanElasticLoads(std::span<const SlotMap* const> maps, const IndexSets& sets,
                                       ElasticPlan* plan);
  int32_t budget_;
  uint64_t generation_ = 0;
  std::vector<std::vector<int32_t>> tokens_;  // [n_sets][resident] ascending
  std::vector<std::vector<int32_t>> slots_;   // parallel to tokens_
  // Back buffers: the state planned by plan `next_plan_` (0: none), which ApplyElasticPlan swaps in.
  // Written by planning, which is otherwise const on the map (the visible state does not change).
  mutable std::vector<std::vector<int32_t>> next_tokens_, next_slots_;
  mutable uint64_t next_plan_ = 0;
};

/// One row to load: token position `token` of the host KV into slot `slot` of the slot buffer.
struct RowCopy {
  int32_t token = 0;
  int32_t slot = 0;
};

/// Rows to copy for one layer, CSR by set like IndexSets: set s's copies are
/// copies[copy_ptr[s], copy_ptr[s + 1]) and apply to every KV head that set s covers.
struct CopyList {
  int32_t n_seqs = 0;
  int32_t n_kv_heads = 0;
  int32_t sets_per_seq = 0;
  int32_t budget = 0;
  std::vector<int32_t> copy_ptr;  // [n_seqs * sets_per_seq + 1]
  std::vector<RowCopy> copies;
  int64_t head_rows = 0;         // rows per layer and K or V: Σ copies × heads covered
  int64_t full_reload_rows = 0;  // rows a full reload of S_now would move, same unit

  /// An empty list for these dimensions (copy_ptr = {0}: sets' ranges are appended after it).
  void Reset(int32_t seqs, int32_t kv_heads, int32_t sets, int32_t rows_budget) {
    n_seqs = seqs;
    n_kv_heads = kv_heads;
    sets_per_seq = sets;
    budget = rows_budget;
    copy_ptr.assign(1, 0);
    copies.clear();
    head_rows = 0;
    full_reload_rows = 0;
  }
};

struct ElasticPlan {
  CopyList copies;                   // S_now \ S_last per set
  std::vector<int32_t> slots;        // [sets.indices.size()] slot of each position of S_now
  std::vector<uint64_t> generations; // [n_seqs] map generations the plan was made against
  uint64_t id = 0;                   // unique per PlanElasticLoads call (the maps' back buffers name it)
  int64_t set_rows = 0;   // Σ |S_now| over sets
  int64_t kept_rows = 0;  // Σ |S_now ∩ S_last|
  double overlap_ratio() const { return set_rows == 0 ? 1.0 : static_cast<double>(kept_rows) / set_rows; }

  // Per-set copy counts of PlanElasticLoads, kept so that planning into the same plan allocates nothing.
  std::vector<int32_t> scratch_set_copies;  // [n_sets]
  std::vector<RowCopy> scratch_copies;      // [>= |S_now|] each set's copies at its indptr offset
};

/// Plans the step for a batch: maps[i] belongs to sequence i of `sets` and must have
/// n_sets == sets.sets_per_seq and room for each set (budget >= |set|). Does not change the maps' state
/// (it fills their back buffers: plans of one map are not made concurrently).
/// O(Σ |S_now| + Σ |S_last| + n_sets · budget).
absl::StatusOr<ElasticPlan> PlanElasticLoads(std::span<const SlotMap* const> maps, const IndexSets& sets);
/// The same into `plan`, reusing its buffers (a decode loop keeps one plan: no allocation per step once
/// the buffers have grown). Sequences are planned in parallel (core/parallel/parallel_for.h); the result does not
/// depend on the thread count. On error `plan` is left unspecified.
absl::Status PlanElasticLoads(std::span<const SlotMap* const> maps, const IndexSets& sets, ElasticPlan* plan);

/// Commits a plan made from `sets` against `maps` (same order). Refuses stale or mismatched plans. When
/// a map's back buffers still hold this plan's state (no other plan of that map since), the commit swaps
/// them in (O(n_sets)) and trusts that `sets` is unchanged since planning; otherwise it validates `sets`
/// and copies the state from `sets` and plan.slots.
absl::Status ApplyElasticPlan(const ElasticPlan& plan, const IndexSets& sets, std::span<SlotMap* const> maps);

/// The copies that fill an empty slot buffer with all of S_now in the slot layout `slots` (parallel to
/// sets.indices): used for a layer newly moved to host, and as the reference in tests.
CopyList FullReloadCopies(const IndexSets& sets, std::span<const int32_t> slots);
/// The same into `out`, reusing its buffers.
void FullReloadCopies(const IndexSets& sets, std::span<const int32_t> slots, CopyList* out);

/// Byte counters of the copy engine (cumulative; one instance per engine, no globals).
struct ElasticCounters {
  int64_t steps = 0;
  int64_t set_rows = 0;          // Σ |S_now|
  int64_t kept_rows = 0;         // Σ |S_now ∩ S_last|
  int64_t rows_loaded = 0;       // rows copied (K and V each count), all layers
  int64_t bytes_loaded = 0;
  int64_t bytes_full_reload = 0; // what full reloads of the same layers would have moved
  // Copy time (backends with a copy stream; CUDA measures with events, one load per offloaded layer and
  // step, added when the load's events are read back, i.e. at the next ElasticLoad of that layer: the
  // figures lag by one step). `copy_seconds` is Σ load durations on the copy stream (start after its
  // waits to end of the gather); `copy_exposed_seconds` is Σ time the compute stream stood waiting for a
  // load (or copy-stream work queued ahead of it) when it reached that layer's sparse attention; the
  // rest of the duration overlapped with compute (hidden).
  int64_t copy_timed_loads = 0;
  double copy_seconds = 0;
  double copy_exposed_seconds = 0;
  double copy_hidden_seconds() const {
    return copy_seconds > copy_exposed_seconds ? copy_seconds - copy_exposed_seconds : 0;
  }
  void AddPlan(const ElasticPlan& plan);
  double overlap_ratio() const { return set_rows == 0 ? 1.0 : static_cast<double>(kept_rows) / set_rows; }
};

/// One sequence's part of one offloaded layer, host memory, any dtype (K, V and buffers share it).
struct LayerRows {
  Tensor host_k, host_v;  // [n_kv_heads, capacity, head_dim] the host copy (source)
  Tensor slot_k, slot_v;  // [n_kv_heads, slots >= the map's budget, head_dim] the slot buffer (destination)
};

/// CPU copy engine: executes `copies` for one layer (memcpy of each row of K and V). `seqs` [n_seqs].
/// Checks every token < capacity and slot < buffer slots before copying anything. Adds bytes to `counters`
/// (may be null).
absl::Status ExecuteCopiesCpu(const CopyList& copies, std::span<const LayerRows> seqs, ElasticCounters* counters);

}  // namespace specontext
