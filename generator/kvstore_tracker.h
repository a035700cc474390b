// The generator's use of the shared-memory KV store (--kvstore NAME, kvstore/kv_store.h): the segment is
// created or attached at start (reclaiming what dead owners left: a generator killed with SIGKILL and
// restarted gets every orphaned block back), a heartbeat thread marks this owner alive, and every
// request has a per-sequence table entry holding its token count and, in sparse mode, the runs of blocks
// that hold its host KV tier (offloaded layers' host_k/host_v, generator/kvstore_host_tier.h).
//
// A request's blocks are freed when its last run is (the tensors viewing them are gone), never while the
// engine may still use them: End() only marks the entry when runs are live.
// Sequence keys are (pid << 32 | engine id), so generators sharing one segment never collide.
// Thread-safe.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/metrics/metrics.h"
#include "core/backend.h"
#include "kvstore/kv_store.h"

namespace specontext::generator {

struct KvStoreTrackerOptions {
  std::string name;
  uint64_t blocks = 4096;                  // geometry when this process creates the segment
  uint64_t block_bytes = 64 * 1024;
  absl::Duration heartbeat = absl::Seconds(1);
  // End() calls per request: 1 (the service) or 2 (the service and KvStoreHooks::Release, sparse mode).
  int ends_per_request = 1;
};

class KvStoreTracker {
 public:
  /// Opens (create-or-attach) the segment, logs and counts the reclaim, starts the heartbeat.
  static absl::StatusOr<std::unique_ptr<KvStoreTracker>> Create(const KvStoreTrackerOptions& options,
                                                                metrics::Registry* registry);
  /// Unregisters the segment from the backend (when registered), stops the heartbeat, closes the segment.
  /// Every tensor viewing the segment must be gone (the engine is destroyed first).
  ~KvStoreTracker();

  /// Registers the segment's block data with `backend` (CUDA: cudaHostRegister, mapped) so that views of
  /// blocks can serve as host KV tiers; once. `backend` must outlive the tracker.
  absl::Status RegisterWith(Backend* backend);
  Backend* backend() const { return backend_; }

  /// A request was submitted (engine id). Ignored when End already ran for it.
  void Begin(uint64_t engine_id, uint64_t tokens);
  void SetTokens(uint64_t engine_id, uint64_t tokens);
  /// `n` consecutive blocks for the request (its entry is created if needed); returns the first block.
  absl::StatusOr<uint32_t> AllocateRun(uint64_t engine_id, uint32_t n);
  /// Frees a run of AllocateRun; the request's entry goes with its last run when End already ran.
  void FreeRun(uint64_t engine_id, uint32_t first, uint32_t n);
  /// The request finished (its handler returned, or its KV was released): frees its entry and blocks (when
  /// no run is live); later Begin/SetTokens for it are no-ops. Called `ends_per_request` times per request.
  void End(uint64_t engine_id);
  /// Counts a host tier layer that did not fit in the segment (it went to pinned memory instead); returns
  /// how many so far (callers log the 1st, 2nd, 4th, ... only).
  int64_t CountTierFallback();

  /// Bytes of blocks held by live runs (this process).
  int64_t tier_bytes() const { return tier_bytes_.load(); }
  kvstore::KvStore& store() { return *store_; }

 private:
  KvStoreTracker() = default;
  uint64_t Key(uint64_t engine_id) const { return (pid_ << 32) | (engine_id & 0xffffffffu); }
  void Count(const absl::Status& st);
  void HeartbeatLoop();
  void RefreshGauges();

  struct Entry {
    bool begun = false;     // the handler's Begin ran
    int ends = 0;           // End calls so far
    bool in_store = false;  // the segment holds its sequence
    int live_runs = 0;      // runs of AllocateRun not yet freed
  };
  // Frees the entry's sequence once ended and without live runs, and forgets it once every party is done.
  void Settle(uint64_t engine_id, Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::unique_ptr<kvstore::KvStore> store_;
  uint64_t pid_ = 0;
  Backend* backend_ = nullptr;  // registered with; null = none
  absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  int ends_per_request_ = 1;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Duration heartbeat_;
  std::thread heartbeat_thread_;
  std::atomic<int64_t> tier_bytes_{0};
  std::atomic<int64_t> tier_fallback_count_{0};
  metrics::Counter* errors_ = nullptr;
  metrics::Counter* tier_fallbacks_ = nullptr;
  metrics::Gauge* used_blocks_ = nullptr;
  metrics::Gauge* free_blocks_ = nullptr;
  metrics::Gauge* sequences_ = nullptr;
  metrics::Gauge* tier_gauge_ = nullptr;
};

}  // namespace specontext::generator
