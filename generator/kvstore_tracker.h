// The generator's use of the shared-memory KV store (--kvstore NAME, kvstore/kv_store.h): the segment is
// created or attached at start (reclaiming what dead owners left: a generator killed with SIGKILL and
// restarted gets every orphaned block back), a heartbeat thread marks this owner alive, and every
// request has a per-sequence table entry holding its token count and, in sparse mode, blocks reserved
// for the bytes of its host KV tier (offloaded layers).
//
// Scope: the blocks are a reservation that mirrors the host tier's size; the host tier itself still
// lives in Backend::AllocPinnedHost memory (backing it with the blocks is not wired yet).
// Sequence keys are (pid << 32 | engine id), so generators sharing one segment never collide.
// Thread-safe.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/metrics/metrics.h"
#include "core/model/sparse_hooks.h"
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
  ~KvStoreTracker();

  /// A request was submitted (engine id). Ignored when End already ran for it.
  void Begin(uint64_t engine_id, uint64_t tokens);
  void SetTokens(uint64_t engine_id, uint64_t tokens);
  /// Grows the request's blocks to cover `bytes` (never shrinks while the request lives).
  void ReserveBytes(uint64_t engine_id, int64_t bytes);
  /// The request finished (its handler returned, or its KV was released): frees its entry and blocks;
  /// later Begin/SetTokens/ReserveBytes for it are no-ops. Called `ends_per_request` times per request.
  void End(uint64_t engine_id);

  kvstore::KvStore& store() { return *store_; }

 private:
  KvStoreTracker() = default;
  uint64_t Key(uint64_t engine_id) const { return (pid_ << 32) | (engine_id & 0xffffffffu); }
  void Count(const absl::Status& st);
  void HeartbeatLoop();
  void RefreshGauges();

  std::unique_ptr<kvstore::KvStore> store_;
  uint64_t pid_ = 0;
  absl::Mutex mu_;
  struct Entry {
    bool begun = false;     // the handler's Begin ran
    int ends = 0;           // End calls so far
    bool in_store = false;  // the segment holds its sequence
    uint32_t blocks = 0;    // blocks reserved for it
  };
  absl::flat_hash_map<uint64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  int ends_per_request_ = 1;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Duration heartbeat_;
  std::thread heartbeat_thread_;
  metrics::Counter* errors_ = nullptr;
  metrics::Gauge* used_blocks_ = nullptr;
  metrics::Gauge* free_blocks_ = nullptr;
  metrics::Gauge* sequences_ = nullptr;
};

/// SparseDecodeHooks decorator: after each allocation and step, reserves kvstore blocks for every live
/// sequence's host KV bytes (layers moved to host) and records its token count; Release ends it.
class KvStoreHooks : public SparseDecodeHooks {
 public:
  KvStoreHooks(std::shared_ptr<SparseDecodeHooks> inner, KvStoreTracker* tracker)
      : inner_(std::move(inner)), tracker_(tracker) {}
  absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateKv(uint64_t id, int32_t capacity, int32_t budget) override;
  void Release(uint64_t id) override;
  absl::Status Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                       Tensor* logits) override;
  int32_t default_budget() const override { return inner_->default_budget(); }
  SparseEngineStats stats() const override { return inner_->stats(); }

 private:
  void Sync(uint64_t id, const SequenceKv& kv);
  std::shared_ptr<SparseDecodeHooks> inner_;
  KvStoreTracker* tracker_;
  absl::flat_hash_map<uint64_t, const SequenceKv*> live_;  // engine thread
};

}  // namespace specontext::generator
