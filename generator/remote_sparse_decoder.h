// Split-mode sparse decoding: a SparseDecodeHooks whose index sets come from a specontext-retriever over
// one Retriever.Session stream (DESIGN.md §2). Per step the generator streams the observed tokens
// (prompt chunks and each decode token) of all its sequences as one ObserveBatch (the retriever runs one
// head forward over them; a retriever of the same version is needed) and, for decode steps whose past
// exceeds the budget, sends a
// Select and waits up to `step_deadline` for the Selection (CSR index sets). KV tiers, elastic loads and
// the memory planner work as in SparseDecoder (remote_sparse_tiers.cc). A step whose selection is
// missing — retriever down, late or in error — falls back and is counted; the request never fails for it:
// resident layers attend densely over their full KV (exact), offloaded layers to the sink tokens plus the
// most recent (budget - sink) tokens (what their slot buffers can hold).
// A background thread reconnects with exponential backoff; the engine thread then re-opens every live
// sequence on the new session and re-observes its tokens, after which sparse steps resume.
//
// Logits: Forward writes host logits; ForwardDevice leaves them on the backend (the engine samples there and
// downloads token ids only), the prompt and decode passes' rows assembled as SparseDecoder does
// (core/model/pass_outputs.h). A decode forward is recorded as a step graph where SparseDecoder's would be
// (Transformer::GraphableLayers). Each step's host time by phase is kept for the metrics (SplitStepSeconds,
// path_stats()).
//
// EAGLE-3 heads (RetrieverInfo.fused_width > 0, learnt from GetInfo at connect): the forwards capture the
// target's hidden states at the head's fusion layers (on the device, into a buffer kept across steps so that
// the decode step can still be graphed; downloaded once after each forward) and every Observe carries, per
// token, the fused features of the position before it (remote_sparse_observe.cc): decode tokens are
// observed before their forward (their features came from the previous one), prompt chunks after theirs,
// split into messages of at most observe_message_bytes. The features are sent (and kept for replay after a reconnect: fused_width x 2 or 4
// bytes per token) in bf16 when the backend computes in bf16 (lossless), else in f32, so split mode selects
// exactly what in-process mode does. A sequence prefilled before the head's needs were known cannot be
// replayed and stays on the fallback.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/metrics/metrics.h"
#include "core/model/sparse_hooks.h"
#include "core/model/transformer.h"
#include "core/sparse/elastic.h"
#include "core/sparse/index_sets.h"
#include "core/model/layer_tiers.h"
#include "core/model/pass_outputs.h"
#include "core/model/pinned_host_cache.h"
#include "core/sparse/memory_planner.h"
#include "generator/sparse_metrics.h"
#include "proto/specontext.grpc.pb.h"

namespace specontext::generator {

struct RemoteSparseOptions {
  std::string address;                              // HOST:PORT of the retriever
  std::shared_ptr<grpc::ChannelCredentials> credentials;  // TLS to the retriever (null: plaintext)
  std::string tls_server_name;                      // name checked against its certificate (empty: the host)
  int32_t budget = 2048;                            // default B per KV head
  int32_t sink = 1;
  bool batch_level = false;                         // one index set per sequence for all KV heads
  size_t observe_message_bytes = 1 << 20;           // largest features payload of one Observe (chunks prompts)
  // Largest message the channel receives (--retriever-max-message-bytes, the retriever's own default): a
  // Selection reply holds sequences x budget x KV heads x 4 bytes of positions, 4 MiB at 64 sequences of
  // B = 2048 over 8 KV heads, past gRPC's 4 MiB default.
  int64_t max_message_bytes = int64_t{64} << 20;
  absl::Duration step_deadline = absl::Milliseconds(200);
  int64_t gpu_memory_limit = 0;                     // planner's device limit (0: the backend's; both 0: off)
  int32_t kv_grow_rows = 2048;                      // device KV growth chunk (SparseOptions::kv_grow_rows)
  int32_t max_context = 0;                          // SparseOptions::max_context (0: the model's context)
  SparseStepShape step;                             // SparseOptions::step (the engine's largest step)
  absl::Duration backoff_min = absl::Milliseconds(50);
  absl::Duration backoff_max = absl::Seconds(2);
  metrics::Histogram* retrieval_latency = nullptr;  // Select -> Selection, seconds (may be null)
};

/// The arguments of the channel to the retriever: the receive limit (max_message_bytes) and the TLS name
/// override (tls_server_name).
grpc::ChannelArguments RetrieverChannelArguments(const RemoteSparseOptions& options);

/// Checks a retriever's answer to one Select against what the decode forward will require, so a bad
/// answer becomes a fallback step instead of failing the batch: valid sets (ValidateIndexSets), of
/// the model's `n_kv_heads`, `sets_per_seq` sets for each of the `past.size()` sequences,
/// seq_len[i] == past[i] (the forward attends over that past) and every set within `budget` (the
/// Select's budget, which is also the capacity of the offloaded layers' slot buffers).
/// InvalidArgument naming the first violation.
absl::Status ValidateSelection(const IndexSets& sets, std::span<const int32_t> past,
                               int32_t n_kv_heads, int32_t sets_per_seq, int32_t budget);

class RemoteSparseDecoder : public SparseDecodeHooks {
 public:
  /// `model` must outlive the decoder. Starts the connection thread (the retriever may be down: the
  /// decoder then falls back until it comes up).
  static absl::StatusOr<std::shared_ptr<RemoteSparseDecoder>> Create(Transformer* model, RemoteSparseOptions options);
  ~RemoteSparseDecoder() override;

  absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateKv(uint64_t id, int32_t capacity, int32_t budget) override;
  void Release(uint64_t id) override;
  absl::Status Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                       Tensor* logits) override;
  /// The same step with its logits left on the model's backend: f32 [fwd.size(), vocab], valid until the next
  /// call. Any backend (the CPU backend's "device" is host memory).
  absl::StatusOr<Tensor> ForwardDevice(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs) override;
  int32_t default_budget() const override { return options_.budget; }
  int32_t max_step_tokens() const override { return options_.step.max_tokens_per_step; }
  int32_t max_step_seqs() const override { return options_.step.max_batch; }
  SparseEngineStats stats() const override;

  /// Any thread. Its step_seconds are those of the steps completed so far.
  RetrievalPathStats path_stats() const;
  /// Moves layers [gpu_layers, L) of every live sequence (and of later ones) to host now and caps the
  /// resident layers there (as SparseDecoder::OffloadLayers; LayerTiers::Offload). Engine thread.
  absl::Status OffloadLayers(int32_t gpu_layers);
  int32_t gpu_layers() const { return tiers_->gpu_layers(); }

 private:
  struct Seq {
    SequenceKv* kv = nullptr;
    int32_t capacity = 0;
    int32_t rows = 0;  // device rows of its resident layers (grown in chunks before the forward needing them)
    int32_t budget = 0;
    std::vector<int32_t> tokens;  // every token fed so far (replayed into a new session)
    uint64_t session = 0;         // generation of the session it is open on (0: none)
    std::unique_ptr<SlotMap> map; // token -> slot of the offloaded layers' slot buffers
    // EAGLE-3 heads: the fused features sent with each token (wire dtype, [tokens, fused_width]) for replay,
    // and the last position's features (the next token's row).
    std::vector<uint8_t> features;
    std::vector<float> last_features;
    bool features_complete = true;  // every observed token has its row (else it cannot be re-opened)
  };
  struct Stream;  // one Retriever.Session call and its reader thread

  RemoteSparseDecoder(Transformer* model, RemoteSparseOptions options);
  void ConnectLoop();
  // Engine thread: the live stream, re-opening sequences on it when it is new; null when down.
  std::shared_ptr<Stream> Usable();
  bool Send(Stream& s, const v1::RetrieverRequest& req);
  // Engine thread: sends one Select per budget group of `ids` and waits for the answers, into *out (the
  // groups merged in batch order); false when down, late or in error. `past[i]`: the past tokens of seqs[i]
  // this step attends over (answers must match it).
  bool SelectRemote(std::span<Seq* const> seqs, std::span<const uint64_t> ids, std::span<const int32_t> past,
                    IndexSets* out);
  void MarkBroken(const std::shared_ptr<Stream>& s);
  // remote_sparse_tiers.cc: the planner and layer moves, and one decode forward.
  absl::Status MakePlanner();
  // Plans the tiers for the rows the sequences hold after this forward, then grows those of `fwd`.
  absl::Status PlanLayers(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> steps);
  int64_t DeviceRowsInFlight() const;
  std::span<const TierSeq> TierSeqs();  // the live sequences for tiers_ (in tier_seqs_, reused)
  // `device`: as Run's, for this pass's `*out`.
  absl::Status Decode(std::span<const ForwardSeq> part, std::span<Seq* const> seqs, std::span<const uint64_t> ids,
                      Tensor* out, HiddenCapture* capture, bool device);
  // Forward (`device` false: writes the host *logits) and ForwardDevice (true: sets *logits to device logits).
  absl::Status Run(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> steps, Tensor* logits,
                   bool device);
  absl::Status RunPasses(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> steps, Tensor* logits,
                         bool device);
  // EAGLE-3 heads: capture_ set up for a forward of n_tokens rows (null for a head without features), and its
  // rows downloaded into captured_ (f32 [n_tokens, fused_width]) after the forward.
  absl::StatusOr<HiddenCapture*> PrepareCapture(int64_t n_tokens);
  absl::Status DownloadCapture();
  // Adds the time since the last phase boundary to `*phase` (a field of step_secs_) and starts the next phase.
  void EndPhase(double* phase);
  // remote_sparse_observe.cc. Engine thread: takes the head's feature needs from a stream's GetInfo.
  void LearnHead(const Stream& s);
  // The Observes of one engine step (or of a replay) gathered into ObserveBatch messages: one per step,
  // more only past the retriever's max_tokens_per_observe over the batch, observe_message_bytes of
  // features, or a sequence whose tokens take several chunks (an id appears once per batch).
  struct PendingObserves {
    v1::RetrieverRequest req;  // its observe_batch
    absl::flat_hash_set<uint64_t> ids;
    size_t tokens = 0;
    size_t bytes = 0;
  };
  // Records `tokens` of `seq` (with their fused rows: [n, fused_width] f32, null for a head without features)
  // and queues them in `batch` for `s` (may be null) when the sequence is open on it; false when a send
  // (of a full batch) failed.
  bool ObserveTokens(Stream* s, PendingObserves& batch, uint64_t id, Seq& seq, std::span<const int32_t> tokens,
                     const float* fused);
  // Queues tokens [from, to) of `seq` (and their recorded features) in `batch`, in chunks within the limits,
  // sending the batch first whenever a chunk would not fit it.
  bool QueueObserves(Stream& s, PendingObserves& batch, uint64_t id, const Seq& seq, size_t from, size_t to);
  // Sends `batch` as one ObserveBatch (nothing when empty) and empties it; false when the send failed.
  bool FlushObserves(Stream& s, PendingObserves& batch);
  // Rows for `n` tokens of a prompt chunk whose forward captured `captured` (f32 [rows, fused_width]) from row
  // `first_row` on.
  std::vector<float> PromptFeatures(const Seq& seq, const float* captured, int64_t first_row, int64_t n) const;
  size_t feature_bytes() const { return static_cast<size_t>(fused_width_) * (features_bf16_ ? 2 : 4); }

  Transformer* model_;
  RemoteSparseOptions options_;
  absl::flat_hash_map<uint64_t, Seq> seqs_;  // engine thread
  SparseEngineStats stats_;                  // engine thread
  uint64_t step_ = 0;                        // engine thread
  std::optional<LayerTiers> tiers_;  // engine thread: resident layers, planner, moves (MakePlanner)
  std::vector<TierSeq> tier_seqs_;
  std::shared_ptr<PinnedHostCache> host_cache_ = PinnedHostCache::Create();  // host tier without a kvstore
  std::vector<int32_t> fusion_layers_;  // engine thread: the head's (empty: token ids only)
  int64_t fused_width_ = 0;
  int32_t observe_tokens_ = 4096;       // tokens per Observe (the retriever's limit)
  bool head_known_ = false;             // a GetInfo was seen
  bool features_bf16_ = false;          // wire dtype of features: bf16 when the backend computes in bf16

  // Engine thread: per-step scratch, reused so that a step allocates little once grown.
  std::vector<ForwardSeq> pass_fwd_;  // Run's split into the prompt and the decode pass
  std::vector<Seq*> pass_seqs_;
  std::vector<uint64_t> pass_ids_;
  std::vector<size_t> pass_rows_;
  PassLogits pass_logits_;            // both passes' logits rows (steps with both passes)
  HiddenCapture capture_;             // EAGLE-3: the forward's on-device capture, a view of capture_buffer_
  Tensor capture_buffer_;             // [most rows so far, fused_width] compute dtype
  std::vector<uint8_t> capture_host_; // its download in the compute dtype (when not f32)
  std::vector<float> captured_;       // f32 [rows, fused_width]: the last forward's captured features
  std::vector<int32_t> budgets_, past_;  // Decode: per sequence
  std::vector<int32_t> group_budgets_, group_of_, row_of_;  // SelectRemote: distinct budgets; per sequence
  std::vector<IndexSets> answers_;    // SelectRemote: one per budget group when a step has several
  IndexSets sets_;                    // the decode pass's index sets (read by its forward)
  ElasticPlan plan_;                  // the decode pass's elastic plan (buffers reused)
  CopyList full_;                     // full reload of layers moved since the last step
  std::vector<SlotMap*> maps_;
  std::vector<const SlotMap*> cmaps_;
  std::vector<const CopyList*> layer_copies_;  // moved into the step's SparseForward and back
  SplitStepSeconds step_secs_;        // the running totals, published into published_secs_ after each step
  absl::Time phase_start_;            // the running step's last phase boundary

  mutable absl::Mutex mu_;
  std::shared_ptr<Stream> stream_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool want_connect_ ABSL_GUARDED_BY(mu_) = true;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread connector_;

  std::atomic<int64_t> remote_steps_{0}, fallback_steps_{0}, reconnects_{0};
  std::atomic<bool> connected_{false};
  std::atomic<double> last_mass_{1.0};
  mutable absl::Mutex secs_mu_;
  SplitStepSeconds published_secs_ ABSL_GUARDED_BY(secs_mu_);
};

}  // namespace specontext::generator
