#include "generator/kvstore_tracker.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace specontext::generator {

absl::StatusOr<std::unique_ptr<KvStoreTracker>> KvStoreTracker::Create(const KvStoreTrackerOptions& o,
                                                                       metrics::Registry* registry) {
  if (o.ends_per_request < 1) return absl::InvalidArgumentError("kvstore tracker: ends_per_request must be >= 1");
  kvstore::KvStoreOptions ko;
  ko.name = o.name;
  ko.mode = kvstore::OpenMode::kCreateOrAttach;
  kvstore::Geometry g;
  g.block_count = o.blocks;
  g.block_bytes = o.block_bytes;
  ko.geometry = g;
  ko.owner_label = "specontext-generator";
  auto store = kvstore::KvStore::Open(ko);
  if (!store.ok()) return absl::Status(store.status().code(), absl::StrCat("--kvstore: ", store.status().message()));
  std::unique_ptr<KvStoreTracker> t(new KvStoreTracker());
  t->store_ = *std::move(store);
  t->pid_ = static_cast<uint64_t>(getpid());
  t->heartbeat_ = o.heartbeat;
  t->ends_per_request_ = o.ends_per_request;
  const kvstore::ReclaimReport& r = t->store_->attach_reclaim();
  SPC_LOG(INFO) << (t->store_->created() ? "kvstore segment created" : "kvstore segment attached")
                << Kv("name", t->store_->name()) << Kv("blocks", t->store_->geometry().block_count)
                << Kv("block_bytes", t->store_->block_bytes()) << Kv("reclaimed_owners", r.owners)
                << Kv("reclaimed_sequences", r.sequences) << Kv("reclaimed_blocks", r.blocks);
  auto counter = [registry](const char* name, const char* help) {
    return registry->AddUnlabeledCounter(name, help);
  };
  auto gauge = [registry](const char* name, const char* help) { return registry->AddUnlabeledGauge(name, help); };
  ASSIGN_OR_RETURN(metrics::Counter * rb, counter("spc_kvstore_reclaimed_blocks_total",
                                                  "Blocks of dead owners reclaimed when this process attached."));
  ASSIGN_OR_RETURN(metrics::Counter * rs, counter("spc_kvstore_reclaimed_sequences_total",
                                                  "Sequences of dead owners reclaimed when this process attached."));
  ASSIGN_OR_RETURN(metrics::Counter * ro, counter("spc_kvstore_reclaimed_owners_total",
                                                  "Dead owners reclaimed when this process attached."));
  rb->Increment(static_cast<double>(r.blocks));
  rs->Increment(static_cast<double>(r.sequences));
  ro->Increment(static_cast<double>(r.owners));
  ASSIGN_OR_RETURN(t->errors_, counter("spc_kvstore_errors_total",
                                       "kvstore operations that failed (the request continues without them)."));
  ASSIGN_OR_RETURN(t->used_blocks_, gauge("spc_kvstore_used_blocks", "Blocks in use in the segment (all owners)."));
  ASSIGN_OR_RETURN(t->free_blocks_, gauge("spc_kvstore_free_blocks", "Free blocks in the segment."));
  ASSIGN_OR_RETURN(t->sequences_, gauge("spc_kvstore_sequences", "Sequences in the segment (all owners)."));
  ASSIGN_OR_RETURN(t->tier_gauge_, gauge("spc_kvstore_host_tier_bytes",
                                         "Bytes of segment blocks holding this process's host KV tier."));
  ASSIGN_OR_RETURN(t->tier_fallbacks_, counter("spc_kvstore_host_tier_fallbacks_total",
                                               "Host KV tier layers placed in pinned memory: no run of blocks fit."));
  t->RefreshGauges();
  t->heartbeat_thread_ = std::thread([raw = t.get()] { raw->HeartbeatLoop(); });
  return t;
}

KvStoreTracker::~KvStoreTracker() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
  if (backend_ != nullptr && store_ != nullptr) {
    Count(backend_->Synchronize());  // the device's last reads of the blocks are done
    Count(backend_->UnregisterHostMemory(store_->data_base()));
  }
  // Close() frees this owner's sequences and releases its slot (a clean exit leaves nothing behind).
  if (store_ != nullptr) Count(store_->Close());
}

void KvStoreTracker::Count(const absl::Status& st) {
  if (st.ok()) return;
  if (errors_ != nullptr) errors_->Increment();
  SPC_LOG(WARNING) << "kvstore operation failed" << Kv("status", st.ToString());
}

absl::Status KvStoreTracker::RegisterWith(Backend* backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("kvstore: no backend to register with");
  if (backend_ != nullptr) return absl::FailedPreconditionError("kvstore: the segment is already registered");
  absl::Status st = backend->RegisterHostMemory(store_->data_base(), store_->data_bytes());
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("--kvstore: registering the segment: ", st.message()));
  backend_ = backend;
  return absl::OkStatus();
}

void KvStoreTracker::RefreshGauges() {
  tier_gauge_->Set(static_cast<double>(tier_bytes_.load()));
  auto s = store_->Stats();
  if (!s.ok()) return;
  used_blocks_->Set(static_cast<double>(s->used_blocks));
  free_blocks_->Set(static_cast<double>(s->free_blocks));
  sequences_->Set(static_cast<double>(s->sequences));
}

void KvStoreTracker::HeartbeatLoop() {
  absl::MutexLock lock(&mu_);
  while (!stop_) {
    mu_.Unlock();
    Count(store_->Heartbeat());
    RefreshGauges();
    mu_.Lock();
    auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; };
    mu_.AwaitWithTimeout(absl::Condition(&stopping), heartbeat_);
  }
}

void KvStoreTracker::Begin(uint64_t engine_id, uint64_t tokens) {
  absl::MutexLock lock(&mu_);
  Entry& e = entries_[engine_id];
  e.begun = true;
  if (e.ends > 0) {  // the engine finished it before the handler got here
    Settle(engine_id, e);
    return;
  }
  if (!e.in_store) {
    absl::Status st = store_->Allocate(Key(engine_id), 0);  // creates the table entry
    e.in_store = st.ok();
    Count(st);
  }
  if (e.in_store) Count(store_->SetTokenCount(Key(engine_id), tokens));
}

void KvStoreTracker::SetTokens(uint64_t engine_id, uint64_t tokens) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(engine_id);
  if (it == entries_.end() || !it->second.in_store || it->second.ends > 0) return;
  Count(store_->SetTokenCount(Key(engine_id), tokens));
}

absl::StatusOr<uint32_t> KvStoreTracker::AllocateRun(uint64_t engine_id, uint32_t n) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<uint32_t> first = store_->AllocateRun(Key(engine_id), n);
  if (!first.ok()) return first.status();
  Entry& e = entries_[engine_id];
  e.in_store = true;
  ++e.live_runs;
  tier_bytes_ += static_cast<int64_t>(n * store_->block_bytes());
  tier_gauge_->Set(static_cast<double>(tier_bytes_.load()));
  return first;
}

void KvStoreTracker::FreeRun(uint64_t engine_id, uint32_t first, uint32_t n) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(engine_id);
  if (it == entries_.end() || it->second.live_runs == 0) {
    Count(absl::InternalError(absl::StrCat("kvstore: free of an unknown run of request ", engine_id)));
    return;
  }
  Entry& e = it->second;
  absl::Status st = store_->FreeRun(Key(engine_id), first, n);
  if (!absl::IsNotFound(st)) Count(st);
  --e.live_runs;
  tier_bytes_ -= static_cast<int64_t>(n * store_->block_bytes());
  tier_gauge_->Set(static_cast<double>(tier_bytes_.load()));
  Settle(engine_id, e);
}

int64_t KvStoreTracker::CountTierFallback() {
  tier_fallbacks_->Increment();
  return ++tier_fallback_count_;
}

void KvStoreTracker::End(uint64_t engine_id) {
  absl::MutexLock lock(&mu_);
  Entry& e = entries_[engine_id];
  ++e.ends;
  Settle(engine_id, e);
}

void KvStoreTracker::Settle(uint64_t engine_id, Entry& e) {
  if (e.ends == 0 || e.live_runs > 0) return;
  if (e.in_store) {
    absl::Status st = store_->FreeSequence(Key(engine_id));
    if (!st.ok() && !absl::IsNotFound(st)) Count(st);
    e.in_store = false;
  }
  // Forgotten once every party is done; until then later calls for the id are no-ops.
  if (e.ends >= ends_per_request_ && e.begun) entries_.erase(engine_id);
}

}  // namespace specontext::generator
