// The engine thread: runs Engine::Step() while there is work (continuous batching: requests join
// and leave between steps) and sleeps otherwise. gRPC handler threads Submit() and Cancel() through
// it; every engine callback runs on this thread.
#pragma once

#include <cstdint>
#include <functional>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/backend.h"
#include "core/model/engine.h"
#include "generator/generator_metrics.h"

namespace specontext::generator {

class EngineLoop {
 public:
  /// All three must outlive the loop. `metrics` may be null.
  EngineLoop(Engine* engine, Backend* backend, GeneratorMetrics* metrics)
      : engine_(engine), backend_(backend), metrics_(metrics) {}
  ~EngineLoop() { Stop(); }
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  void Start();
  /// Stops the thread after the current step; requests still queued stay unfinished, so drain first.
  void Stop();

  /// Any thread. Errors from Engine::Submit (InvalidArgument, ResourceExhausted).
  absl::StatusOr<uint64_t> Submit(GenerationRequest request, StreamCallback callback);
  /// Any thread. The request finishes with kCancelled at the next step (its KV freed there).
  void Cancel(uint64_t id);
  /// Any thread: no request queued or running.
  bool Idle() const { return !engine_->HasWork(); }

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
  void Run();
  void UpdateGauges();

  Engine* engine_;
  Backend* backend_;
  GeneratorMetrics* metrics_;
  std::function<RetrievalPathStats()> retrieval_stats_;
  mutable absl::Mutex mu_;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace specontext::generator
