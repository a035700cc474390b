// The engine thread: runs Engine::Step() while there is work (continuous batching: requests join
// and leave between steps) and sleeps otherwise. gRPC handler threads Submit() and Cancel() through
// it; every engine callback runs on this thread.
//
// With tensor parallelism (a TensorParallelRanks) the loop drives rank 0's engine and the group's other ranks
// in lockstep (generator/tensor_parallel_ranks.h): Submit() and Cancel() are queued and applied to every rank
// between steps, on this thread, in the same order; a step runs Engine::Step() on every rank at once; rank 0's
// events are held until every rank is found to have emitted the same ones, then streamed. A rank that fails
// or emits something else fails the group: every request in flight finishes with INTERNAL and Submit()
// refuses with UNAVAILABLE from then on (failed()).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/backend.h"
#include "core/model/engine.h"
#include "generator/generator_metrics.h"
#include "generator/tensor_parallel_ranks.h"

namespace specontext::generator {

class EngineLoop {
 public:
  /// All must outlive the loop. `metrics` may be null. `tp` (null without tensor parallelism): the engines of
  /// ranks 1..N-1, `engine` being rank 0's, built with the same EngineOptions (their own sparse decoders).
  EngineLoop(Engine* engine, Backend* backend, GeneratorMetrics* metrics, TensorParallelRanks* tp = nullptr)
      : engine_(engine), backend_(backend), metrics_(metrics), tp_(tp) {}
  ~EngineLoop() { Stop(); }
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  void Start();
  /// Stops the thread after the current step; requests still queued stay unfinished, so drain first.
  void Stop();

  /// Any thread. Errors from Engine::Submit (InvalidArgument, ResourceExhausted). With tensor parallelism it
  /// waits for the current step to end (the request joins every rank between two steps); UNAVAILABLE once
  /// the group failed or the loop stopped.
  absl::StatusOr<uint64_t> Submit(GenerationRequest request, StreamCallback callback);
  /// Any thread. The request finishes with kCancelled at the next step (its KV freed there, on every rank).
  void Cancel(uint64_t id);
  /// Any thread: no request queued or running.
  bool Idle() const;
  /// Any thread: the tensor-parallel group failed (never true without tensor parallelism).
  bool failed() const {
    absl::MutexLock lock(&mu_);
    return failed_;
  }

  /// Split mode: where the retrieval-path counters (remote steps, fallbacks, reconnects) come from.
  /// Set before Start(); `source` must be safe to call from any thread.
  void SetRetrievalStats(std::function<RetrievalPathStats()> source) { retrieval_stats_ = std::move(source); }
  /// Engine thread only (stream callbacks run there): the SpeContext counters now.
  SparseEngineStats SparseStatsNow() const { return engine_->sparse_stats(); }
  /// Any thread.
  RetrievalPathStats RetrievalStatsNow() const {
    return retrieval_stats_ ? retrieval_stats_() : RetrievalPathStats{};
  }

 private:
  // A Submit() waiting for the loop to apply it to every rank (tensor parallelism); lives on the caller's stack.
  struct PendingSubmit {
    GenerationRequest request;
    StreamCallback callback;
    absl::StatusOr<uint64_t> result = absl::UnknownError("not applied");
    bool done = false;  // guarded by mu_
  };
  // A request admitted to the group: rank 0's id and the client's callback (loop thread only).
  struct LiveRequest {
    uint64_t id = 0;
    StreamCallback callback;
  };

  void Run();
  void RunTensorParallel();
  // Loop thread, between steps: applies `p` to every rank and sets its result.
  void ApplySubmit(PendingSubmit* p);
  // Loop thread: one step of every rank, then the comparison and rank 0's events to the clients.
  void StepTensorParallel();
  // Loop thread: aborts the group, frees every rank's requests and finishes the clients' with INTERNAL.
  void FailGroup(const std::string& why);
  void UpdateGauges();

  Engine* engine_;
  Backend* backend_;
  GeneratorMetrics* metrics_;
  TensorParallelRanks* tp_;
  std::function<RetrievalPathStats()> retrieval_stats_;
  mutable absl::Mutex mu_;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool running_ ABSL_GUARDED_BY(mu_) = false;  // the thread is serving (tensor parallelism: Submit may wait)
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<PendingSubmit*> pending_submits_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> pending_cancels_ ABSL_GUARDED_BY(mu_);
  // Loop thread only (tensor parallelism): requests not yet finished towards their client, by id; rank 0's
  // record and events of the step in progress.
  std::map<uint64_t, std::shared_ptr<LiveRequest>> live_;
  RankStepRecord record0_;
  std::vector<std::pair<std::shared_ptr<LiveRequest>, StreamEvent>> held_;
  std::thread thread_;
};

}  // namespace specontext::generator
