// A bounded channel carrying one request's stream events from the engine thread to its gRPC handler.
//
// The engine thread must never block on a slow client (it would stall every other sequence of the
// batch), so Push() never waits: when `capacity` batches are already pending, the new event is merged
// into the newest pending batch (token ids appended, text concatenated). Memory stays bounded by
// `capacity` messages plus the request's own max_new_tokens; nothing is ever dropped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/model/engine.h"

namespace specontext::generator {

/// What the handler writes as one GenerateResponse: the tokens and text since the previous batch,
/// and, on the last batch, the engine's final event.
struct EventBatch {
  std::vector<int32_t> tokens;
  std::string text;
  bool done = false;
  FinishReason reason = FinishReason::kNone;
  absl::Status status;
  GenerationStats stats;
  absl::Time first_token_at = absl::InfinitePast();  // when the first token of this batch arrived
};

class EventChannel {
 public:
  explicit EventChannel(size_t capacity) : capacity_(capacity < 1 ? 1 : capacity) {}

  /// Engine thread. Never blocks.
  void Push(const StreamEvent& ev) {
    absl::MutexLock lock(&mu_);
    if (batches_.empty() || batches_.size() < capacity_ || batches_.back().done) {
      batches_.emplace_back();
    } else {
      ++merged_;
    }
    EventBatch& b = batches_.back();
    if (ev.token >= 0) {
      if (b.tokens.empty()) b.first_token_at = absl::Now();
      b.tokens.push_back(ev.token);
    }
    b.text += ev.text;
    if (ev.done) {
      b.done = true;
      b.reason = ev.reason;
      b.status = ev.status;
      b.stats = ev.stats;
    }
  }

  /// Handler thread. Waits up to `timeout` for a batch; false when none arrived.
  bool Pop(absl::Duration timeout, EventBatch* out) {
    absl::MutexLock lock(&mu_);
    auto ready = [this]() { return !batches_.empty(); };
    mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
    if (batches_.empty()) return false;
    *out = std::move(batches_.front());
    batches_.pop_front();
    return true;
  }

  /// Events that were merged into an earlier batch because the handler fell behind.
  uint64_t merged() const {
    absl::MutexLock lock(&mu_);
    return merged_;
  }

 private:
  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::deque<EventBatch> batches_ ABSL_GUARDED_BY(mu_);
  uint64_t merged_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace specontext::generator
