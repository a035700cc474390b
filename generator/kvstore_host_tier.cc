#include "generator/kvstore_host_tier.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/model/kv_tiers.h"
#include "core/status_macros.h"

namespace specontext::generator {

absl::StatusOr<Tensor> KvStoreTierAllocator::Alloc(Backend& backend, DType dtype, const Shape& shape) {
  const uint64_t bytes = static_cast<uint64_t>(NumElements(shape)) * DTypeSize(dtype);
  const uint64_t bb = tracker_->store().block_bytes();
  const uint64_t n = std::max<uint64_t>(1, (bytes + bb - 1) / bb);
  absl::StatusOr<uint32_t> first = n < kvstore::kNone ? tracker_->AllocateRun(engine_id_, static_cast<uint32_t>(n))
                                                      : absl::ResourceExhaustedError("run too long");
  if (!first.ok()) {
    // No room in the segment: this layer's copy goes to pinned memory, the request goes on.
    const int64_t n_fallbacks = tracker_->CountTierFallback();
    if ((n_fallbacks & (n_fallbacks - 1)) == 0) {  // 1st, 2nd, 4th, ...: a full segment must not flood the log
      SPC_LOG(WARNING) << "kvstore: host KV tier layer in pinned memory instead" << Kv("request", engine_id_)
                       << Kv("bytes", bytes) << Kv("fallbacks", n_fallbacks) << Kv("status", first.status().ToString());
    }
    return backend.AllocPinnedHost(dtype, shape, MemoryKind::kKvCache);
  }
  uint8_t* data = tracker_->store().data_base() + uint64_t{*first} * bb;
  KvStoreTracker* tracker = tracker_;
  const uint64_t id = engine_id_;
  const uint32_t run_first = *first, run_n = static_cast<uint32_t>(n);
  std::shared_ptr<void> storage(data, [tracker, id, run_first, run_n](void*) {
    tracker->FreeRun(id, run_first, run_n);
  });
  absl::StatusOr<Tensor> t = backend.WrapHostTensor(data, dtype, shape, storage);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat("kvstore host tier: ", t.status().message()));
  }
  return t;
}

absl::StatusOr<std::unique_ptr<SequenceKv>> KvStoreHooks::AllocateKv(uint64_t id, int32_t capacity, int32_t budget) {
  if (!host_tier_) return inner_->AllocateKv(id, capacity, budget);
  auto host = std::make_shared<KvStoreTierAllocator>(tracker_, id);
  std::unique_ptr<SequenceKv> kv;
  {
    // Layers the inner decoder already keeps on host get their copies from the kvstore right away.
    ScopedHostKvAllocator scope(host);
    ASSIGN_OR_RETURN(kv, inner_->AllocateKv(id, capacity, budget));
  }
  // A decoder that did not allocate through kv_tiers: move what it put in pinned memory (nothing to keep yet).
  if (kv->host_allocator == nullptr) RETURN_IF_ERROR(AdoptHostTier(*backend_, kv.get(), host, 0));
  return kv;
}

void KvStoreHooks::Release(uint64_t id) {
  inner_->Release(id);
  tracker_->End(id);
}

absl::Status KvStoreHooks::Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                                   Tensor* logits) {
  absl::Status st = inner_->Forward(fwd, seqs, logits);
  for (size_t i = 0; i < fwd.size() && i < seqs.size(); ++i) {
    tracker_->SetTokens(seqs[i].id, static_cast<uint64_t>(fwd[i].past_len) + fwd[i].tokens.size());
  }
  return st;
}

absl::StatusOr<Tensor> KvStoreHooks::ForwardDevice(std::span<const ForwardSeq> fwd,
                                                    std::span<const SparseStepSeq> seqs) {
  absl::StatusOr<Tensor> logits = inner_->ForwardDevice(fwd, seqs);
  if (absl::IsUnimplemented(logits.status())) return logits;  // nothing ran: the engine calls Forward
  for (size_t i = 0; i < fwd.size() && i < seqs.size(); ++i) {
    tracker_->SetTokens(seqs[i].id, static_cast<uint64_t>(fwd[i].past_len) + fwd[i].tokens.size());
  }
  return logits;
}

SparseEngineStats KvStoreHooks::stats() const {
  SparseEngineStats s = inner_->stats();
  s.host_kv_bytes += tracker_->tier_bytes();
  return s;
}

}  // namespace specontext::generator
