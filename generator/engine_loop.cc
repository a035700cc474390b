#include "generator/engine_loop.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/log.h"

namespace specontext::generator {

void EngineLoop::Start() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = false;
    running_ = true;
  }
  thread_ = std::thread([this] { tp_ != nullptr ? RunTensorParallel() : Run(); });
}

void EngineLoop::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  absl::MutexLock lock(&mu_);
  running_ = false;
  // Submits that came after the last step: the loop will not apply them.
  for (PendingSubmit* p : pending_submits_) {
    p->result = absl::UnavailableError("the engine loop has stopped");
    p->done = true;
  }
  pending_submits_.clear();
}

bool EngineLoop::Idle() const {
  if (tp_ != nullptr) {
    absl::MutexLock lock(&mu_);
    if (!pending_submits_.empty()) return false;
  }
  return !engine_->HasWork();
}

absl::StatusOr<uint64_t> EngineLoop::Submit(GenerationRequest request, StreamCallback callback) {
  if (tp_ != nullptr) {
    PendingSubmit p{std::move(request), std::move(callback)};
    absl::MutexLock lock(&mu_);
    if (failed_) {
      return absl::UnavailableError("the tensor-parallel group failed; the generator must be restarted");
    }
    if (stop_ || !running_) return absl::UnavailableError("the engine loop is not running");
    pending_submits_.push_back(&p);
    wake_ = true;
    mu_.Await(absl::Condition(&p.done));
    return std::move(p.result);
  }
  absl::StatusOr<uint64_t> id = engine_->Submit(std::move(request), std::move(callback));
  if (id.ok()) {
    absl::MutexLock lock(&mu_);
    wake_ = true;
  }
  return id;
}

void EngineLoop::Cancel(uint64_t id) {
  if (tp_ != nullptr) {
    absl::MutexLock lock(&mu_);
    pending_cancels_.push_back(id);
    wake_ = true;
    return;
  }
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

void EngineLoop::RunTensorParallel() {
  UpdateGauges();
  while (true) {
    std::deque<PendingSubmit*> submits;
    std::vector<uint64_t> cancels;
    {
      absl::MutexLock lock(&mu_);
      if (stop_) break;
      if (!engine_->HasWork() && pending_submits_.empty() && pending_cancels_.empty()) {
        auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return wake_ || stop_; };
        mu_.AwaitWithTimeout(absl::Condition(&woken), absl::Milliseconds(500));
        if (stop_) break;
      }
      wake_ = false;
      submits.swap(pending_submits_);
      cancels.swap(pending_cancels_);
    }
    // Between steps: every rank gets the same calls in the same order (cancels name ids submitted earlier).
    for (uint64_t id : cancels) {
      engine_->Cancel(id);
      tp_->Cancel(id);
    }
    for (PendingSubmit* p : submits) {
      ApplySubmit(p);
      absl::MutexLock lock(&mu_);
      p->done = true;  // the caller may return (and free p) from here on
    }
    if (!failed() && engine_->HasWork()) StepTensorParallel();
    UpdateGauges();
  }
}

void EngineLoop::ApplySubmit(PendingSubmit* p) {
  if (failed()) {
    p->result = absl::UnavailableError("the tensor-parallel group failed; the generator must be restarted");
    return;
  }
  const std::vector<absl::StatusOr<uint64_t>> others = tp_->Submit(p->request);
  auto live = std::make_shared<LiveRequest>();
  live->callback = std::move(p->callback);
  // Rank 0's events are held until the step is checked (StepTensorParallel).
  p->result = engine_->Submit(std::move(p->request), [this, live](const StreamEvent& ev) {
    RecordEvent(&record0_, live->id, ev);
    held_.emplace_back(live, ev);
  });
  if (p->result.ok()) {
    live->id = *p->result;
    live_[live->id] = live;
  }
  for (size_t i = 0; i < others.size(); ++i) {
    const bool same = others[i].ok() == p->result.ok() &&
                      (p->result.ok() ? *others[i] == *p->result : others[i].status().code() == p->result.status().code());
    if (!same) {
      FailGroup(absl::StrCat("rank ", i + 1, " answered the submission with ",
                             others[i].ok() ? absl::StrCat("id ", *others[i]) : others[i].status().ToString(),
                             ", rank 0 with ",
                             p->result.ok() ? absl::StrCat("id ", *p->result) : p->result.status().ToString()));
      return;  // an id given out is finished with INTERNAL through its callback
    }
  }
}

void EngineLoop::StepTensorParallel() {
  tp_->StartStep();
  const absl::Status st = engine_->Step();
  record0_.step_code = st.code();
  record0_.fence_ok = tp_->Fence0();
  record0_.running = engine_->running();
  record0_.queued = engine_->queued();
  const std::vector<RankStepRecord> others = tp_->FinishStep();
  RankStepRecord mine = std::move(record0_);
  record0_ = RankStepRecord{};
  std::vector<std::pair<std::shared_ptr<LiveRequest>, StreamEvent>> held;
  held.swap(held_);
  if (!st.ok()) {
    SPC_LOG(ERROR) << "engine step failed" << Kv("status", st.ToString()) << Kv("rank", 0);
    if (metrics_ != nullptr) metrics_->engine_step_errors->Increment();
  }
  std::string why;
  for (size_t i = 0; i < others.size() && why.empty(); ++i) {
    const std::string diff = mine.Diff(others[i]);
    if (!diff.empty()) why = absl::StrCat("rank ", i + 1, " differs from rank 0: ", diff);
  }
  // A step error every rank shares is kept (the engine finished the affected requests, the others go on) only
  // when it is the sparse planner's agreed refusal; any other error may have left the ranks apart.
  if (why.empty() && !st.ok() && !absl::IsResourceExhausted(st)) {
    why = absl::StrCat("the step failed on every rank: ", st.ToString());
  }
  if (!why.empty()) {
    FailGroup(why);
    return;
  }
  for (auto& [live, ev] : held) {
    if (live->callback) live->callback(ev);
    if (ev.done) live_.erase(live->id);
  }
}

void EngineLoop::FailGroup(const std::string& why) {
  SPC_LOG(ERROR) << "tensor-parallel group failed: requests in flight finish with INTERNAL and new ones are "
                    "refused; restart the generator"
                 << Kv("why", why) << Kv("requests", live_.size());
  tp_->Abort();
  {
    absl::MutexLock lock(&mu_);
    failed_ = true;
  }
  if (metrics_ != nullptr) metrics_->engine_step_errors->Increment();
  // Free every rank's sequences: cancelled, they finish without a forward (no collective), so the aborted
  // group is not needed; the events of this clean-up step go nowhere.
  for (const auto& [id, live] : live_) {
    engine_->Cancel(id);
    tp_->Cancel(id);
  }
  tp_->StartStep();
  (void)engine_->Step();
  tp_->FinishStep();
  held_.clear();
  record0_ = RankStepRecord{};
  const absl::Status internal = absl::InternalError(absl::StrCat("tensor-parallel ranks failed (", why, ")"));
  std::map<uint64_t, std::shared_ptr<LiveRequest>> live;
  live.swap(live_);
  for (auto& [id, req] : live) {
    StreamEvent ev;
    ev.done = true;
    ev.reason = FinishReason::kError;
    ev.status = internal;
    if (req->callback) req->callback(ev);
  }
}

}  // namespace specontext::generator
