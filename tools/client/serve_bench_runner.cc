#include "tools/client/serve_bench_runner.h"

#include <grpcpp/client_context.h>
#include <grpcpp/support/client_callback.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <limits>
#include <mutex>
#include <thread>
#include <utility>

namespace specontext::client {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

class StreamCall;

// The gRPC run's state: calls whose OnDone ran, for the sending thread to delete: a call never
// deletes itself, so none is still being torn down on a gRPC thread once the run has returned (and
// the process may exit).
struct GrpcState : LoadState {
  std::vector<StreamCall*> ended;
};

// One Generate stream. Created by the sending thread, which deletes it once OnDone (gRPC's last
// call into it) has handed over its record.
class StreamCall final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  StreamCall(GrpcState* state, int64_t index, const v1::GenerateRequest& request,
             Clock::time_point run_start, double timeout_s)
      : state_(state), index_(index), request_(request), run_start_(run_start) {
    ctx_.set_deadline(std::chrono::system_clock::now() +
                      std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6)));
    times_.reserve(static_cast<size_t>(std::clamp(request.max_new_tokens(), 0, 1 << 16)));
  }

  void Start(v1::Generator::Stub* stub) {
    send_ = Clock::now();
    stub->async()->Generate(&ctx_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended: OnDone follows
    const Clock::time_point now = Clock::now();
    const int k = response_.token_ids_size();
    // k tokens in one message arrive together: one gap to the previous message, then k - 1 of 0.
    times_.insert(times_.end(), static_cast<size_t>(k), now);
    if (response_.has_usage()) prompt_tokens_ = response_.usage().prompt_tokens();
    if (k > 0) {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->tokens += k;
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    const Clock::time_point end = Clock::now();
    RequestRecord r;
    r.index = index_;
    r.send_s = Seconds(send_ - run_start_);
    r.latency_s = Seconds(end - send_);
    r.output_tokens = static_cast<int64_t>(times_.size());
    r.output_tokens_asked = request_.max_new_tokens();
    r.prompt_tokens = prompt_tokens_ > 0 ? prompt_tokens_ : request_.token_ids_size();
    if (!times_.empty()) r.ttft_s = Seconds(times_.front() - send_);
    for (size_t i = 1; i < times_.size(); ++i)
      r.itl_s.push_back(Seconds(times_[i] - times_[i - 1]));
    r.code = static_cast<int>(status.error_code());
    if (!status.ok()) r.error = status.error_message();
    {
      // Under the lock: once it is released, the run may end and the state and this call go away.
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->ended.push_back(this);
      state_->EndLocked(std::move(r),
                        status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                            status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED);
    }
  }

 private:
  GrpcState* state_;
  int64_t index_;
  v1::GenerateRequest request_;
  Clock::time_point run_start_;
  Clock::time_point send_;
  grpc::ClientContext ctx_;
  v1::GenerateResponse response_;
  std::vector<Clock::time_point> times_;  // arrival of each output token
  int64_t prompt_tokens_ = 0;
};

// Prints a progress line at most once a second until the run is done; the token rate is the one of
// the last interval.
void ProgressLoop(LoadState* state, const std::string& phase, size_t total,
                  Clock::time_point start) {
  std::unique_lock<std::mutex> lock(state->mu);
  Clock::time_point last = start;
  int64_t tokens_before = 0;
  while (true) {
    if (state->cv.wait_until(lock, last + std::chrono::seconds(1), [&] { return state->done; })) {
      return;
    }
    const Clock::time_point now = Clock::now();
    const double rate = static_cast<double>(state->tokens - tokens_before) / Seconds(now - last);
    tokens_before = state->tokens;
    last = now;
    std::fprintf(stderr,
                 "specontext-loadgen %s %.0fs: %lld/%lld completed/issued (of %zu), %lld errors, "
                 "%.0f output tok/s\n",
                 phase.c_str(), Seconds(now - start),
                 static_cast<long long>(state->completed + state->failed),
                 static_cast<long long>(state->issued), total,
                 static_cast<long long>(state->failed), rate);
  }
}

// Deletes the calls that ended; called without the lock held.
void DeleteEnded(GrpcState* state) {
  std::vector<StreamCall*> ended;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    ended.swap(state->ended);
  }
  for (StreamCall* call : ended) delete call;
}

}  // namespace

void LoadState::EndLocked(RequestRecord r, bool stops) {
  --in_flight;
  ++(r.ok() ? completed : failed);
  if (stops && stop_code == 0) stop_code = r.code;
  records.push_back(std::move(r));
  cv.notify_all();
}

LoadResult DriveLoad(
    LoadState* state, size_t n, const LoadOptions& o,
    const std::function<void(size_t, Clock::time_point, std::unique_lock<std::mutex>&)>& send,
    const std::function<void()>& reap) {
  const bool closed = o.concurrency > 0;
  const int64_t cap =
      closed ? o.concurrency
             : (o.max_concurrency > 0 ? o.max_concurrency : std::numeric_limits<int64_t>::max());
  const Clock::time_point start = Clock::now();
  const bool bounded = o.duration_s > 0;
  const Clock::time_point stop_at =
      start + std::chrono::microseconds(static_cast<int64_t>(std::min(o.duration_s, 1e9) * 1e6));
  std::thread progress;
  if (o.progress) progress = std::thread(ProgressLoop, state, o.phase, n, start);

  size_t sent = 0;
  for (; sent < n; ++sent) {
    reap();
    std::unique_lock<std::mutex> lock(state->mu);
    if (!closed && sent < o.arrivals_s.size()) {
      const Clock::time_point at =
          start + std::chrono::microseconds(static_cast<int64_t>(o.arrivals_s[sent] * 1e6));
      if (bounded && at >= stop_at) break;
      state->cv.wait_until(lock, at, [&] { return state->stop_code != 0; });
    }
    const auto may_send = [&] { return state->in_flight < cap || state->stop_code != 0; };
    if (bounded) {
      state->cv.wait_until(lock, stop_at, may_send);
    } else {
      state->cv.wait(lock, may_send);
    }
    if (state->stop_code != 0 || (bounded && Clock::now() >= stop_at)) break;
    ++state->in_flight;
    ++state->issued;
    send(sent, start, lock);
  }

  LoadResult result;
  {
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->in_flight == 0; });
    state->done = true;
    if (sent < n) result.stop_code = state->stop_code;
    result.records = std::move(state->records);
  }
  state->cv.notify_all();
  if (progress.joinable()) progress.join();
  reap();
  result.not_sent = static_cast<int64_t>(n - sent);
  std::sort(result.records.begin(), result.records.end(),
            [](const RequestRecord& a, const RequestRecord& b) { return a.index < b.index; });
  return result;
}

LoadResult RunLoad(v1::Generator::Stub* stub, const std::vector<v1::GenerateRequest>& requests,
                   const LoadOptions& o) {
  GrpcState state;
  return DriveLoad(
      &state, requests.size(), o,
      [&](size_t i, Clock::time_point start, std::unique_lock<std::mutex>& lock) {
        lock.unlock();
        (new StreamCall(&state, static_cast<int64_t>(i), requests[i], start, o.timeout_s))
            ->Start(stub);
      },
      [&] { DeleteEnded(&state); });
}

}  // namespace specontext::client
