// Split-mode sparse decoding: a SparseDecodeHooks whose index sets come from a specontext-retriever over
// one Retriever.Session stream (DESIGN.md §2). Per step the generator streams the observed tokens
// (prompt chunks and each decode token) and, for decode steps whose past exceeds the budget, sends a
// Select and waits up to `step_deadline` for the Selection (CSR index sets). KV tiers, elastic loads and
// the memory planner work as in SparseDecoder (remote_sparse_tiers.cc). A step whose selection is
// missing — retriever down, late or in error — falls back and is counted; the request never fails for it:
// with every layer resident the fallback is exact dense attention; with offloaded layers it attends to
// the sink tokens plus the most recent (budget - sink) tokens (what the slot buffers can hold).
// A background thread reconnects with exponential backoff; the engine thread then re-opens every live
// sequence on the new session and re-observes its tokens, after which sparse steps resume.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/metrics/metrics.h"
#include "core/model/sparse_hooks.h"
#include "core/model/transformer.h"
#include "core/sparse/elastic.h"
#include "core/sparse/index_sets.h"
#include "core/sparse/memory_planner.h"
#include "generator/sparse_metrics.h"
#include "proto/specontext.grpc.pb.h"

namespace specontext::generator {

struct RemoteSparseOptions {
  std::string address;                              // HOST:PORT of the retriever
  int32_t budget = 2048;                            // default B per KV head
  int32_t sink = 1;
  absl::Duration step_deadline = absl::Milliseconds(200);
  int64_t gpu_memory_limit = 0;                     // planner's device limit (0: the backend's; both 0: off)
  absl::Duration backoff_min = absl::Milliseconds(50);
  absl::Duration backoff_max = absl::Seconds(2);
  metrics::Histogram* retrieval_latency = nullptr;  // Select -> Selection, seconds (may be null)
};

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
  int32_t default_budget() const override { return options_.budget; }
  SparseEngineStats stats() const override;

  /// Any thread.
  RetrievalPathStats path_stats() const;

 private:
  struct Seq {
    SequenceKv* kv = nullptr;
    int32_t capacity = 0;
    int32_t budget = 0;
    std::vector<int32_t> tokens;  // every token fed so far (replayed into a new session)
    uint64_t session = 0;         // generation of the session it is open on (0: none)
    std::unique_ptr<SlotMap> map; // token -> slot of the offloaded layers' slot buffers
  };
  struct Stream;  // one Retriever.Session call and its reader thread

  RemoteSparseDecoder(Transformer* model, RemoteSparseOptions options);
  void ConnectLoop();
  // Engine thread: the live stream, re-opening sequences on it when it is new; null when down.
  std::shared_ptr<Stream> Usable();
  bool Send(Stream& s, const v1::RetrieverRequest& req);
  // Engine thread: sends Select for `ids` and waits for the answer; nullopt when down, late or in error.
  std::optional<IndexSets> SelectRemote(std::span<Seq* const> seqs, std::span<const uint64_t> ids);
  void MarkBroken(const std::shared_ptr<Stream>& s);
  // remote_sparse_tiers.cc: the planner and layer moves, and one decode forward.
  absl::Status MakePlanner();
  absl::Status PlanLayers(std::span<const ForwardSeq> fwd);
  absl::Status Decode(std::span<const ForwardSeq> part, std::span<Seq* const> seqs, std::span<const uint64_t> ids,
                      Tensor* out);

  Transformer* model_;
  RemoteSparseOptions options_;
  absl::flat_hash_map<uint64_t, Seq> seqs_;  // engine thread
  SparseEngineStats stats_;                  // engine thread
  uint64_t step_ = 0;                        // engine thread
  int32_t gpu_layers_ = 0;            // engine thread: layers whose KV stays on the device
  std::vector<bool> reload_pending_;  // [L] moved to host since the last decode step
  std::optional<MemoryPlanner> planner_;

  mutable absl::Mutex mu_;
  std::shared_ptr<Stream> stream_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool want_connect_ ABSL_GUARDED_BY(mu_) = true;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread connector_;

  std::atomic<int64_t> remote_steps_{0}, fallback_steps_{0}, reconnects_{0};
  std::atomic<bool> connected_{false};
  std::atomic<double> last_mass_{1.0};
};

}  // namespace specontext::generator
