#include "generator/kvstore_tracker.h"

#include <unistd.h>

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
  auto counter = [&](const char* name, const char* help) -> absl::StatusOr<metrics::Counter*> {
    ASSIGN_OR_RETURN(metrics::CounterFamily * f, registry->AddCounter(name, help));
    return f->WithLabels({});
  };
  auto gauge = [&](const char* name, const char* help) -> absl::StatusOr<metrics::Gauge*> {
    ASSIGN_OR_RETURN(metrics::GaugeFamily * f, registry->AddGauge(name, help));
    return f->WithLabels({});
  };
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
  // Close() frees this owner's sequences and releases its slot (a clean exit leaves nothing behind).
  if (store_ != nullptr) Count(store_->Close());
}

void KvStoreTracker::Count(const absl::Status& st) {
  if (st.ok()) return;
  if (errors_ != nullptr) errors_->Increment();
  SPC_LOG(WARNING) << "kvstore operation failed" << Kv("status", st.ToString());
}

void KvStoreTracker::RefreshGauges() {
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
    if (e.ends >= ends_per_request_) entries_.erase(engine_id);
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

void KvStoreTracker::ReserveBytes(uint64_t engine_id, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  const uint64_t bb = store_->block_bytes();
  const uint32_t want = static_cast<uint32_t>((static_cast<uint64_t>(std::max<int64_t>(0, bytes)) + bb - 1) / bb);
  Entry& e = entries_[engine_id];
  if (e.ends > 0 || (e.in_store && want <= e.blocks)) return;
  absl::Status st = store_->Allocate(Key(engine_id), want - e.blocks);  // creates the entry when new
  if (st.ok()) {
    e.in_store = true;
    e.blocks = want;
  }
  Count(st);
}

void KvStoreTracker::End(uint64_t engine_id) {
  absl::MutexLock lock(&mu_);
  Entry& e = entries_[engine_id];
  if (e.in_store) {
    absl::Status st = store_->FreeSequence(Key(engine_id));
    if (!st.ok() && !absl::IsNotFound(st)) Count(st);
    e.in_store = false;
    e.blocks = 0;
  }
  // Forgotten once every party is done; until then later calls for the id are no-ops.
  if (++e.ends >= ends_per_request_ && e.begun) entries_.erase(engine_id);
}

void KvStoreHooks::Sync(uint64_t id, const SequenceKv& kv) {
  int64_t bytes = 0;
  for (size_t l = 0; l < kv.host_k.size(); ++l) {
    if (!kv.host_k[l].empty()) bytes += static_cast<int64_t>(kv.host_k[l].nbytes() + kv.host_v[l].nbytes());
  }
  tracker_->ReserveBytes(id, bytes);
}

absl::StatusOr<std::unique_ptr<SequenceKv>> KvStoreHooks::AllocateKv(uint64_t id, int32_t capacity, int32_t budget) {
  ASSIGN_OR_RETURN(std::unique_ptr<SequenceKv> kv, inner_->AllocateKv(id, capacity, budget));
  live_[id] = kv.get();
  Sync(id, *kv);
  return kv;
}

void KvStoreHooks::Release(uint64_t id) {
  inner_->Release(id);
  live_.erase(id);
  tracker_->End(id);
}

absl::Status KvStoreHooks::Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                                   Tensor* logits) {
  absl::Status st = inner_->Forward(fwd, seqs, logits);
  // Layer moves apply to every live sequence: re-check all of them.
  for (const auto& [id, kv] : live_) Sync(id, *kv);
  for (size_t i = 0; i < fwd.size() && i < seqs.size(); ++i) {
    tracker_->SetTokens(seqs[i].id, static_cast<uint64_t>(fwd[i].past_len) + fwd[i].tokens.size());
  }
  return st;
}

}  // namespace specontext::generator
