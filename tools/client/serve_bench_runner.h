// Issues the Generate calls of the serving benchmark (specontext-loadgen) and times them.
//
// Two load modes, as in vLLM's benchmark_serving and genai-perf:
// - closed loop: `concurrency` calls in flight; each one that ends lets the next one start.
// - open loop: call i is sent arrivals_s[i] after the start (a Poisson process, or all at once),
//   whatever is in flight, unless `max_concurrency` calls are: then it waits for one to end. Its
//   send time is when it is actually sent, so TTFT and E2EL leave that wait out.
// Calls run on gRPC's callback API: thousands in flight need no thread each. Every call has a
// deadline. The first call that fails with UNAVAILABLE (the server went away) or DEADLINE_EXCEEDED
// (it stopped answering in time) stops the sending: the calls in flight end (at the latest at their
// deadline) and the run returns, instead of spending the rest of the plan on a dead server.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "proto/specontext.grpc.pb.h"
#include "tools/client/serve_bench_stats.h"

namespace specontext::client {

struct LoadOptions {
  int64_t concurrency = 0;         // > 0: closed loop with this many calls in flight
  std::vector<double> arrivals_s;  // open loop (concurrency == 0): send offsets, one per request
  int64_t max_concurrency = 0;     // open loop: most calls in flight (0 = no cap)
  double duration_s = 0;           // no call is sent after this many seconds (0 = no bound)
  double timeout_s = 300;          // deadline of each call
  bool progress = false;           // a line on stderr at most once a second
  std::string phase;               // names the run in the progress lines ("warmup", "benchmark")
};

struct LoadResult {
  std::vector<RequestRecord> records;  // one per call sent, in the order of `requests`
  int64_t not_sent = 0;  // requests left when the duration or a failure stopped the sending
  int stop_code = 0;     // UNAVAILABLE or DEADLINE_EXCEEDED when such a failure stopped it
};

// What the requests of one run share with the thread that sends them, whatever the transport
// (gRPC here, HTTP in serve_bench_http.cc). Guarded by mu.
struct LoadState {
  std::mutex mu;
  std::condition_variable cv;  // a request ended, or the run is over (progress thread)
  int64_t in_flight = 0;
  int64_t issued = 0;
  int64_t completed = 0;
  int64_t failed = 0;
  int64_t tokens = 0;
  int stop_code = 0;  // the first UNAVAILABLE or DEADLINE_EXCEEDED: send no more
  bool done = false;
  std::vector<RequestRecord> records;

  /// A request's end, called with mu held: counts it and keeps its record; `stops` (its failure
  /// means the server is gone or hung) stops the sending unless an earlier one did. Wakes the
  /// sender.
  void EndLocked(RequestRecord r, bool stops);
};

/// The load modes above over any transport: starts requests 0..n-1 in the order and at the times
/// `options` says, then waits for every one sent to end. `send(i, run_start, lock)` starts request
/// i with `lock` (on state->mu) held, and may release it; the request's end must call EndLocked.
/// `reap()` runs without the lock before each send and after the last end (to free ended requests).
LoadResult DriveLoad(LoadState* state, size_t n, const LoadOptions& options,
                     const std::function<void(size_t, std::chrono::steady_clock::time_point,
                                              std::unique_lock<std::mutex>&)>& send,
                     const std::function<void()>& reap);

/// Sends `requests` to `stub` as `options` says and waits for every call sent to end. Records are
/// timed from the start of this run. output_tokens_asked is each request's max_new_tokens;
/// prompt_tokens the server's count (usage) or, without it, the request's token_ids.
LoadResult RunLoad(v1::Generator::Stub* stub, const std::vector<v1::GenerateRequest>& requests,
                   const LoadOptions& options);

}  // namespace specontext::client
