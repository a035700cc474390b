// SpeContext sparse decoding on top of a Transformer (DESIGN.md §4), the implementation of
// SparseDecodeHooks the Engine uses in sparse mode. Per step:
//   1. the memory planner (measured mode, Backend::memory_report and the device limit) is checked and whole
//      layers move to host from the last layer backward when a threshold is crossed;
//   2. prompt chunks run dense (KV of offloaded layers goes to the host copy) and fill the retrieval head's
//      K cache (eagle3 heads get the target's hidden states at their fusion layers, captured in the forward
//      on the device);
//   3. decoding sequences: the head observes the current tokens of the whole batch in one forward on the
//      model's backend (DeviceRetrievalHead; its per-sequence K caches are backend tensors), the backend's
//      selection (Backend::StartSelectIndexSets: the CUDA kernels, or the CPU reference) gives the index sets
//      (head-level by default, per-request budget, `sink` first tokens), left on the device where the
//      backend can (SparseOptions::defer_selection) so the forward starts without waiting for them, or
//      waited for and rewritten to a fixed overlap (synthetic_overlap, benchmarks); PlanElasticLoads plans
//      every offloaded layer's copies (a layer moved since the last step gets FullReloadCopies), with
//      deferred sets once the resident layers are enqueued (SparseForward::before_offloaded), the forward
//      runs them and sparse attention, then ApplyElasticPlan commits the slot maps. When every past is <=
//      its budget and no layer is offloaded the forward uses exact dense attention.
// The host time of each decode phase is accumulated in SparseEngineStats::decode_seconds (no device
// syncs added), and a step allocates no host memory once its scratch has grown (plan, copy lists and
// index sets are reused; last_sets() is the step's sets swapped out, not copied).
// Under tensor parallelism (the model's tensor_parallel().size > 1) each rank has its own decoder over its
// shard, with a replicated head, its own sets, tiers and loads; layer moves and weak-retrieval fallback
// decisions are agreed on by all-reduce (core/model/sparse_tensor_parallel.h).
// Engine thread only.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "core/model/attention_recall_probe.h"
#include "core/model/layer_tiers.h"
#include "core/model/pass_outputs.h"
#include "core/model/pinned_host_cache.h"
#include "core/model/sparse_hooks.h"
#include "core/model/transformer.h"
#include "core/sparse/memory_planner.h"
#include "core/sparse/retrieval_head.h"
#include "core/sparse/retrieval_head_device.h"
#include "core/sparse/selection.h"
#include "core/sparse/selection_source.h"
#include "core/sparse/synthetic_overlap.h"

namespace specontext {

struct SparseOptions {
  int32_t budget = 2048;  // default B per KV head (requests may override)
  int32_t sink = 1;       // first positions always selected
  SelectionMode mode = SelectionMode::kHeadLevel;
  /// Device bytes the planner plans for; 0 = the backend's limit (memory_report().limit); when both are 0
  /// the planner is off (every layer stays resident unless OffloadLayers is called).
  int64_t gpu_memory_limit = 0;
  /// Benchmark option, 0 = off (serving). In (0, 1]: after the real selection has run (its cost stays in
  /// the step), every set is replaced by one keeping round(synthetic_overlap · |S|) positions of the same
  /// (sequence, KV head)'s previous set and filling the rest with positions outside it, pseudo-random with
  /// a fixed seed, the sink always kept (core/sparse/synthetic_overlap.h), so that the elastic loader sees a
  /// controlled overlap even with random weights. Outputs are then no longer the model's.
  double synthetic_overlap = 0;
  /// Resident layers' device KV (and the retrieval head's K cache) grows in chunks of this many tokens as a
  /// sequence grows, so the GPU holds what sequences use rather than what they may reach, and the planner
  /// moves layers to host only when the tokens in flight need it. 0: the whole capacity at admission.
  int32_t kv_grow_rows = 2048;
  /// Leave the step's index sets on the device (Backend::StartSelectIndexSets): the forward starts without
  /// waiting for them and, with layers offloaded, the elastic plan runs while the resident layers compute.
  /// false: the host waits for the sets before the forward (the environment's SPC_DEFER_SELECTION=0 too).
  /// The synthetic overlap always waits (it rewrites the sets on the host).
  bool defer_selection = true;
  /// The longest sequence (prompt + generated tokens) this decoder admits; 0: the model's context. The
  /// planner reserves device memory for the prefill staging of one sequence this long (an offloaded layer's
  /// rows, staged per prompt chunk), so a server that caps its requests keeps that much more KV resident;
  /// AllocateKv refuses longer sequences (OutOfRange).
  int32_t max_context = 0;
  /// Where the index sets come from (core/sparse/selection_source.h): the retrieval head (serving), or, to
  /// evaluate it through this same path, window / oracle / quest, which need no head (Create takes a null
  /// head for them). oracle and quest select in every layer (SparseForward::layer_selection) and need every
  /// layer resident: a step with offloaded layers fails with FailedPrecondition.
  SelectionSource source = SelectionSource::kHead;
  /// Weak-retrieval fallback, head source only; 0 = off. Decided per sequence: a sequence whose head selection
  /// kept a mean attention mass (SelectionResult::captured_mass over its query heads, the head's own
  /// softmax) below this attends to every past position in every resident layer (SparseDecodeDesc::
  /// dense_resident: exact for it, no new sets or copies); the other sequences of the step keep their sets,
  /// and offloaded layers keep the head's sets for every sequence (their slot buffers hold only those rows;
  /// a fallback does not load a whole past from host). Counted in SparseEngineStats::
  /// weak_retrieval_fallback_steps (steps with a weak sequence) and weak_retrieval_fallback_sequences
  /// (sequence-steps that fell back). The step waits for its sets before the forward (no deferred selection).
  /// Under tensor parallelism the ranks add their query heads' mass with one all-reduce per step
  /// (f32 [n_seqs]), so every rank takes the same decisions (docs/tensor-parallel.md "Sparse decoding").
  double fallback_mass = 0;
  /// Attention recall probe (null: off, nothing runs): called after every decode step with the recall of
  /// each sequence, layer and query head (core/model/attention_recall_probe.h). Probed steps run op by op.
  AttentionRecallObserver recall_observer;
  /// The engine's largest step (EngineOptions::max_tokens_per_step, max_batch): the planner counts one step's
  /// transient bytes at this shape (SparseStepWorkspaceBytes) as fixed, so a step of the engine never meets
  /// a device limit the planner filled with KV. An engine with larger steps than this is refused.
  SparseStepShape step;
};

// The measured-mode memory planner for `model` under `gpu_memory_limit` (0: the backend's own limit);
// nullopt when there is no device limit (every layer stays resident). Shared by the in-process and the
// split (remote retriever) decoders so both move layers at the same points. `retrieval_cache_per_token`:
// device bytes of the retrieval head's K cache per token (0 when the head runs elsewhere); the head's
// weights already on the device are measured as kRetrieval.
// `max_context`: the longest sequence admitted (0: the model's context), which sizes the prefill staging
// reserve. `step_workspace`: the transient bytes of one step (SparseStepWorkspaceBytes), counted as fixed.
// ResourceExhausted, naming the step bound, when the fixed bytes alone do not fit the limit.
absl::StatusOr<std::optional<MemoryPlanner>> MakeMeasuredPlanner(const Transformer& model, int32_t budget,
                                                                 int64_t gpu_memory_limit,
                                                                 int64_t retrieval_cache_per_token,
                                                                 int32_t max_context, int64_t step_workspace);

// The most transient backend bytes one engine step over a sparse decoder holds at once, from the shapes the
// code allocates: the forward's activations and f32 logits (Transformer::ForwardWorkspaceBytes) for a
// prompt chunk of max(max_tokens_per_step, max_batch) tokens and max_batch logits rows; with a retrieval
// head (`head` non-null; null for a decoder whose head runs elsewhere): its hidden capture and the
// prompt-chunk Observe beside the logits (DeviceRetrievalHead::ObserveWorkspaceBytes), the decode head
// buffers of every batch size, the backend's selection scratch over `max_context` positions
// (Backend::SelectionWorkspaceBytes) and the recall probe's lse when `recall_probe`; the logits a pass keeps
// while the other pass runs and the merged device logits ([max_batch, vocab] f32 each); the buffers the
// backend's attention keeps between steps (Backend::AttentionWorkspaceBytes: split-K partials of dense and
// sparse attention, batch metadata, index sets), with the weak-retrieval fallback's whole pasts when
// `dense_fallback` (SparseOptions::fallback_mass > 0). The device's prefill
// staging (sized by max_context) is added by MakeMeasuredPlanner.
// The device's prefill staging reserve (0 on the CPU): one sequence of `max_context` tokens (0: the model's
// context) of one layer's K and V, at most 1 GiB (core/cuda/cuda_prefill_staging.cc).
int64_t PrefillStagingReserveBytes(const Transformer& model, int32_t max_context);

int64_t SparseStepWorkspaceBytes(const Transformer& model, const DeviceRetrievalHead* head,
                                 const SparseStepShape& step, int32_t max_context, int32_t budget,
                                 SelectionMode mode, bool recall_probe, bool dense_fallback = false);

class SparseDecoder : public SparseDecodeHooks {
 public:
  /// `model` and `head` must outlive the decoder. Validates the head against the model (dims, KV heads,
  /// vocabulary), the budget/sink against the context, uploads the head to the model's backend and builds
  /// the planner. InvalidArgument / FailedPrecondition with a clear message otherwise. `head` may be null
  /// for the sources that need none (window, oracle, quest): then nothing of a head runs.
  static absl::StatusOr<std::unique_ptr<SparseDecoder>> Create(Transformer* model, const RetrievalHead* head,
                                                               const SparseOptions& options);
  ~SparseDecoder() override;

  absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateKv(uint64_t id, int32_t capacity, int32_t budget) override;
  void Release(uint64_t id) override;
  absl::Status Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                       Tensor* logits) override;
  absl::StatusOr<Tensor> ForwardDevice(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs) override;
  int32_t default_budget() const override { return options_.budget; }
  int32_t max_step_tokens() const override { return options_.step.max_tokens_per_step; }
  int32_t max_step_seqs() const override { return options_.step.max_batch; }
  SparseEngineStats stats() const override;

  /// Moves layers [gpu_layers, L) of every live sequence (and of later ones) to host now, and keeps at most
  /// `gpu_layers` resident from then on (an operator's or a test's cap: the planner still moves more to host
  /// when it must, and brings layers back up to the cap when the sequences in flight fit again).
  absl::Status OffloadLayers(int32_t gpu_layers);
  int32_t gpu_layers() const { return tiers_->gpu_layers(); }
  const std::optional<MemoryPlanner>& planner() const { return tiers_->planner(); }
  /// The last decode step's index sets (tests compare sparse attention against a reference with them). For
  /// oracle and quest these are the window sets that gave the layout; each layer replaced their positions.
  const IndexSets& last_sets() const { return last_sets_; }
  /// The request ids of last_sets()' sequences, in their order (evaluation tools follow each request's
  /// step-to-step overlap with it).
  std::span<const uint64_t> last_set_ids() const { return last_set_ids_; }
  /// The token->slot map of a live sequence (null when unknown): tests check slot buffers against it.
  const SlotMap* slot_map(uint64_t id) const;
  /// The retrieval head's K cache of a live sequence (null when unknown): a backend tensor
  /// [n_kv_heads, rows, head_dim] in the compute dtype (rows <= capacity, growing with the sequence) whose
  /// rows [0, retrieval_len(id)) are valid.
  const Tensor* retrieval_cache(uint64_t id) const;
  int32_t retrieval_len(uint64_t id) const;
  const DeviceRetrievalHead& device_head() const { return *dhead_; }  // head source only
  SelectionSource source() const { return options_.source; }
  /// Where offloaded layers' host copies come from unless a ScopedHostKvAllocator is active at admission (the
  /// services' kvstore): pinned blocks cached for reuse. Reserve() on it pins ahead of generation.
  PinnedHostCache& host_cache() { return *host_cache_; }

 private:
  struct SeqState;
  SparseDecoder(Transformer* model, const RetrievalHead* head, const SparseOptions& options);
  // Plans the layer tiers for the rows the sequences will hold after this forward (moving layers to host
  // when a threshold is crossed), then grows the device KV and head caches of the sequences of `fwd`.
  absl::Status PlanLayers(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs);
  // The live sequences for tiers_, in tier_seqs_ (scratch reused: a step allocates nothing once grown).
  std::span<const TierSeq> TierSeqs();
  int64_t DeviceRowsInFlight() const;  // device rows the live sequences hold (each grows in chunks)
  // Both passes write `*logits`: host logits when it is a host f32 [n, vocab] tensor; with `device` set
  // they replace *logits by the forward's device logits instead.
  absl::Status Prefill(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states, Tensor* logits,
                       bool device);
  absl::Status Decode(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states, Tensor* logits,
                      bool device);
  // Forward and ForwardDevice: `device` false writes the host `*logits`, true sets it to device logits.
  absl::Status Run(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs, Tensor* logits, bool device);
  // The head observes the new tokens of `fwd` (one forward for the batch); q receives their queries
  // [n_tokens, n_heads, head_dim]. eagle3: token t pairs with the features of t-1, from `capture` (this
  // forward's rows) or from the sequence's row of hidden_pool_ (the previous forward's last row).
  absl::Status Observe(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                       const HiddenCapture* capture, Tensor* q);
  // Observe of a decode batch (one token per sequence, past > 0): the head's forward (eagle3: with the
  // gather of the pool rows) is replayed as a step graph (Backend::RunStepGraph) over fixed buffers of
  // decode_heads_, one upload of its inputs before and the K-cache append after. q views a fixed buffer.
  absl::Status ObserveDecode(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states, Tensor* q);
  // Under tensor parallelism: makes the tiers apply the layer moves all ranks agree on.
  void AgreeOnLayerMoves();
  // The part of the head's query [n_q_heads, hd] or K cache [n_kv_heads, rows, hd] this rank selects with: its
  // KV heads' share for head-level selection under TP, `t` itself otherwise.
  Tensor SelectionPart(const Tensor& t) const;
  // Waits for the step's selection where it is still on the device (Backend::FinishSelectIndexSets) and
  // records its captured mass.
  absl::Status TakeSelection();
  // The head source's step: the selection (deferred unless something needs the sets first), into sf->desc;
  // with fallback_mass, the weak sequences go into sf->desc.dense_resident (sparse_decoder_sources.cc).
  absl::Status SelectWithHead(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states, const Tensor& q,
                              SparseForward* sf);
  // Under TP with the fallback on: seq_mass_[i] = the sum over every query head of the whole model of
  // sequence i's captured mass, the same bits on every rank. Each rank sums its own query heads (batch-level:
  // its share of them) and one AllReduceSum over the group adds the ranks; every rank calls it at the same
  // point of each decode step that selects.
  absl::Status SumMassOverRanks(size_t n_seqs);
  // The other sources' step: window sets (oracle, quest: their layout, each layer choosing the positions).
  void SelectWithoutHead(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states, SparseForward* sf);
  // Recall probe around the forward of a sparse step: the lse buffer into sf (zeroed, so that layers which
  // attend densely read as recall 1), then its download and the observer's call. A dense step reports 1.
  absl::Status StartRecallProbe(int64_t n_seqs, SparseForward* sf);
  absl::Status FinishRecallProbe(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                                 const SparseForward& sf);
  // eagle3: stores each sequence's last captured row into its hidden_pool_ row.
  absl::Status KeepLastHidden(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                              const HiddenCapture& capture);
  absl::StatusOr<int32_t> TakeHiddenSlot();
  // eagle3: capture_ set up for a forward of n_tokens rows (its device output a view of capture_buffer_,
  // grown here, so the forward itself allocates nothing for it); null for layer heads.
  absl::StatusOr<HiddenCapture*> PrepareCapture(int64_t n_tokens);

  Transformer* model_;
  const RetrievalHead* head_;
  std::unique_ptr<DeviceRetrievalHead> dhead_;
  SparseOptions options_;
  std::optional<SyntheticOverlap> synthetic_;
  // eagle3: per-sequence fused features of the last processed position, one row per live sequence
  // [slots, fused_width] compute dtype (kRetrieval); rows gathered into the head's input in one op.
  Tensor hidden_pool_;
  HiddenCapture capture_;
  Tensor capture_buffer_;  // [most rows so far, fused_width]: capture_.out views its first rows
  std::vector<int32_t> free_hidden_slots_;
  std::optional<LayerTiers> tiers_;  // resident layers, planner, moves (built by Create)
  std::shared_ptr<PinnedHostCache> host_cache_ = PinnedHostCache::Create();
  std::vector<std::pair<SeqState*, int32_t>> grow_;  // PlanLayers scratch: sequences to grow, to rows
  std::vector<TierSeq> tier_seqs_;                   // TierSeqs scratch
  absl::flat_hash_map<uint64_t, std::unique_ptr<SeqState>> seqs_;
  SparseEngineStats stats_;
  IndexSets last_sets_;
  std::vector<uint64_t> last_set_ids_;  // [last_sets_.n_seqs]
  SelectionResult selection_;
  LayerSelectionSpec layer_spec_;  // oracle, quest: what each layer selects by
  std::vector<int32_t> lens_, budgets_;  // SelectWithoutHead scratch
  std::vector<uint8_t> weak_;            // [n_seqs] the step's weak-retrieval flags (SparseDecodeDesc::dense_resident)
  // Weak-retrieval fallback under TP: each rank's per-sequence sum of its query heads' captured mass, summed
  // over the ranks (SumMassOverRanks). Host f32 [n_seqs] and its backend buffer f32 [max_batch] (allocated at
  // the first step, reused).
  std::vector<float> seq_mass_;
  Tensor seq_mass_scratch_;
  // Recall probe: [n_layers, n_seqs, n_heads, 2] f32 on the backend and its host copy, the step's record.
  Tensor recall_lse_, recall_host_;
  AttentionRecallStep recall_step_;
  int64_t decode_steps_ = 0;
  // Per-step scratch, reused so that a decode step does not reallocate.
  std::vector<int32_t> ids_, gather_;
  std::vector<DeviceRetrievalHead::Seq> head_seqs_;
  std::vector<RowScatter> scatter_;
  std::vector<SelectionQuery> queries_;
  std::vector<PreviousSets*> prev_;
  ElasticPlan plan_;                           // the step's elastic plan (buffers reused)
  CopyList full_;                              // full reload of layers moved since the last step
  std::vector<SlotMap*> maps_;
  std::vector<const SlotMap*> cmaps_;
  std::vector<const CopyList*> layer_copies_;  // moved into the step's SparseForward and back
  std::vector<ForwardSeq> pass_fwd_;           // Forward's split into prompt and decode passes
  std::vector<SeqState*> pass_states_;
  std::vector<size_t> pass_rows_;
  // ObserveDecode's fixed buffers per batch size n: io i32 [3, n] (ids, positions, pool rows), q
  // [n, n_heads, hd] and k [n, n_kv, hd] (views of one block, k right after q); `pool` the hidden_pool_
  // address the graph was recorded with.
  struct DecodeHead {
    Tensor io, q, k;
    const void* pool = nullptr;
  };
  std::map<int64_t, DecodeHead> decode_heads_;
  uint64_t graph_id_ = 0;  // this decoder's range of step-graph keys (ObserveDecode)
  PassLogits pass_logits_;  // both passes' logits rows when a step mixes prompt chunks and decode tokens
};

}  // namespace specontext
