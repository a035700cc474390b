#include "generator/engine_loop.h"

#include "absl/time/clock.h"
#include "core/log.h"

namespace specontext::generator {

void EngineLoop::Start() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = false;
  }
  thread_ = std::thread([this] { Run(); });
}

void EngineLoop::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<uint64_t> EngineLoop::Submit(GenerationRequest request, StreamCallback callback) {
  absl::StatusOr<uint64_t> id = engine_->Submit(std::move(request), std::move(callback));
  if (id.ok()) {
    absl::MutexLock lock(&mu_);
    wake_ = true;
  }
  return id;
}

void EngineLoop::Cancel(uint64_t id) {
  engine_->Cancel(id);
  absl::MutexLock lock(&mu_);
  wake_ = true;
}

void EngineLoop::UpdateGauges() {
  if (metrics_ == nullptr) return;
  metrics_->queue_depth->Set(engine_->queued());
  metrics_->running->Set(engine_->running());
  // The backend is used by one thread at a time: this one.
  metrics_->UpdateMemory(backend_->memory_report());
  if (engine_->sparse()) {
    const RetrievalPathStats r = RetrievalStatsNow();
    metrics_->sparse.Update(engine_->sparse_stats(), r);
    // Fallbacks and reconnects have their own families (spc_retrieval_fallback_steps_total, ...).
    const double fb = static_cast<double>(r.fallback_steps) - metrics_->retriever_fallback_steps->Value();
    if (fb > 0) metrics_->retriever_fallback_steps->Increment(fb);
    const double rc = static_cast<double>(r.reconnects) - metrics_->retriever_reconnects->Value();
    if (rc > 0) metrics_->retriever_reconnects->Increment(rc);
  }
}

void EngineLoop::Run() {
  UpdateGauges();
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (stop_) break;
      if (!engine_->HasWork()) {
        // Sleep until a Submit/Cancel wakes us; the timeout keeps the gauges fresh while idle.
        auto woken = [this]() { return wake_ || stop_; };
        mu_.AwaitWithTimeout(absl::Condition(&woken), absl::Milliseconds(500));
        wake_ = false;
        if (stop_) break;
      } else {
        wake_ = false;
      }
    }
    if (engine_->HasWork()) {
      absl::Status st = engine_->Step();
      if (!st.ok()) {
        // The engine already finished the affected sequences with kError; keep serving the rest.
        SPC_LOG(ERROR) << "engine step failed" << Kv("status", st.ToString());
        if (metrics_ != nullptr) metrics_->engine_step_errors->Increment();
      }
    }
    UpdateGauges();
  }
}

}  // namespace specontext::generator
