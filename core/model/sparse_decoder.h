// SpeContext sparse decoding on top of a Transformer (DESIGN.md §4), the implementation of
// SparseDecodeHooks the Engine uses in sparse mode. Per step:
//   1. the memory planner (measured mode, Backend::memory_report and the device limit) is checked and whole
//      layers move to host from the last layer backward when a threshold is crossed;
//   2. prompt chunks run dense (KV of offloaded layers goes to the host copy) and fill the retrieval head's
//      K cache (eagle3 heads get the target's hidden states at their fusion layers, captured in the forward);
//   3. decoding sequences: the head observes the current token, SelectTopB gives the index sets (head-level
//      by default, per-request budget, `sink` first tokens), PlanElasticLoads plans every offloaded layer's
//      copies (a layer moved since the last step gets FullReloadCopies), the forward runs them and sparse
//      attention, then ApplyElasticPlan commits the slot maps. When every past is <= its budget and no layer
//      is offloaded the forward uses exact dense attention.
// Engine thread only.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "core/model/sparse_hooks.h"
#include "core/model/transformer.h"
#include "core/sparse/memory_planner.h"
#include "core/sparse/retrieval_head.h"
#include "core/sparse/selection.h"

namespace specontext {

struct SparseOptions {
  int32_t budget = 2048;  // default B per KV head (requests may override)
  int32_t sink = 1;       // first positions always selected
  SelectionMode mode = SelectionMode::kHeadLevel;
  /// Device bytes the planner plans for; 0 = the backend's limit (memory_report().limit); when both are 0
  /// the planner is off (every layer stays resident unless OffloadLayers is called).
  int64_t gpu_memory_limit = 0;
};

// The measured-mode memory planner for `model` under `gpu_memory_limit` (0: the backend's own limit);
// nullopt when there is no device limit (every layer stays resident). Shared by the in-process and the
// split (remote retriever) decoders so both move layers at the same points.
absl::StatusOr<std::optional<MemoryPlanner>> MakeMeasuredPlanner(const Transformer& model, int32_t budget,
                                                                 int64_t gpu_memory_limit);

class SparseDecoder : public SparseDecodeHooks {
 public:
  /// `model` and `head` must outlive the decoder. Validates the head against the model (dims, KV heads,
  /// vocabulary), the budget/sink against the context, and builds the planner. InvalidArgument /
  /// FailedPrecondition with a clear message otherwise.
  static absl::StatusOr<std::unique_ptr<SparseDecoder>> Create(Transformer* model, const RetrievalHead* head,
                                                               const SparseOptions& options);
  ~SparseDecoder() override;

  absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateKv(uint64_t id, int32_t capacity, int32_t budget) override;
  void Release(uint64_t id) override;
  absl::Status Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                       Tensor* logits) override;
  int32_t default_budget() const override { return options_.budget; }
  SparseEngineStats stats() const override;

  /// Moves layers [gpu_layers, L) of every live sequence (and of later ones) to host now. Also the
  /// planner's action; exposed as a test hook and for operators. Never moves layers back.
  absl::Status OffloadLayers(int32_t gpu_layers);
  int32_t gpu_layers() const { return gpu_layers_; }
  const std::optional<MemoryPlanner>& planner() const { return planner_; }
  /// The last decode step's index sets (tests compare sparse attention against a reference with them).
  const IndexSets& last_sets() const { return last_sets_; }
  /// The token->slot map of a live sequence (null when unknown): tests check slot buffers against it.
  const SlotMap* slot_map(uint64_t id) const;
  /// The retrieval head's K cache of a live sequence (null when unknown).
  const RetrievalKvCache* retrieval_cache(uint64_t id) const;

 private:
  struct SeqState;
  SparseDecoder(Transformer* model, const RetrievalHead* head, const SparseOptions& options);
  absl::Status PlanLayers(std::span<const ForwardSeq> fwd);
  absl::Status Prefill(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states, Tensor* logits);
  absl::Status Decode(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states, Tensor* logits);
  absl::Status ObserveTokens(SeqState& st, std::span<const int32_t> tokens, const HiddenCapture* capture,
                             int64_t first_row, Tensor* q_last);

  Transformer* model_;
  const RetrievalHead* head_;
  SparseOptions options_;
  std::optional<MemoryPlanner> planner_;
  int32_t gpu_layers_ = 0;
  std::vector<bool> reload_pending_;  // [L] layer moved to host since the last decode step
  absl::flat_hash_map<uint64_t, std::unique_ptr<SeqState>> seqs_;
  SparseEngineStats stats_;
  IndexSets last_sets_;
  SelectionResult selection_;
};

}  // namespace specontext
