// The host KV tier in the shared-memory kvstore (--kvstore NAME with sparse decoding): every offloaded
// layer's host_k and host_v of a request is a view of one run of consecutive kvstore blocks of that
// request's table entry, laid out exactly as AllocPinnedHost memory is ([n_kv_heads, capacity, head_dim]
// in the compute dtype, contiguous; a run is ceil(bytes / block_bytes) blocks and starts on a block, so on
// a 64-byte boundary). With a GPU the segment's block data is registered once (cudaHostRegister, mapped)
// and the elastic gather kernel reads the rows over PCIe through the mapped pointer.
//
// A run is freed when the last tensor viewing it goes (the SequenceKv is destroyed: after the request's
// last forward, which ends with a wait for the device). A layer that finds no run of free blocks goes to
// pinned memory instead and is counted (spc_kvstore_host_tier_fallbacks_total): the request goes on.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/model/sparse_hooks.h"
#include "generator/kvstore_tracker.h"

namespace specontext::generator {

/// HostKvAllocator of one request (engine id): tensors over runs of its kvstore blocks.
class KvStoreTierAllocator : public HostKvAllocator {
 public:
  /// `tracker` must outlive every tensor this allocator makes.
  KvStoreTierAllocator(KvStoreTracker* tracker, uint64_t engine_id) : tracker_(tracker), engine_id_(engine_id) {}
  absl::StatusOr<Tensor> Alloc(Backend& backend, DType dtype, const Shape& shape) override;

 private:
  KvStoreTracker* tracker_;
  uint64_t engine_id_;
};

/// SparseDecodeHooks decorator: the host KV tier of every sequence it admits lives in the kvstore (the inner
/// decoder's AllocateTieredKv and MoveLayerToHost calls get a KvStoreTierAllocator through
/// SequenceKv::host_allocator), token counts go to the request's table entry, Release ends the entry.
class KvStoreHooks : public SparseDecodeHooks {
 public:
  /// `tracker` (registered with `backend`, KvStoreTracker::RegisterWith) must outlive the hooks. With
  /// `host_tier` false (the segment could not be registered) host tiers stay in pinned memory and the
  /// segment only holds the requests' entries.
  KvStoreHooks(std::shared_ptr<SparseDecodeHooks> inner, KvStoreTracker* tracker, Backend* backend,
               bool host_tier = true)
      : inner_(std::move(inner)), tracker_(tracker), backend_(backend), host_tier_(host_tier) {}
  absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateKv(uint64_t id, int32_t capacity, int32_t budget) override;
  void Release(uint64_t id) override;
  absl::Status Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                       Tensor* logits) override;
  absl::StatusOr<Tensor> ForwardDevice(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs) override;
  int32_t default_budget() const override { return inner_->default_budget(); }
  int32_t max_step_tokens() const override { return inner_->max_step_tokens(); }
  int32_t max_step_seqs() const override { return inner_->max_step_seqs(); }
  /// The inner stats with host_kv_bytes counting the kvstore tier too.
  SparseEngineStats stats() const override;

 private:
  std::shared_ptr<SparseDecodeHooks> inner_;
  KvStoreTracker* tracker_;
  Backend* backend_;
  bool host_tier_;
};

}  // namespace specontext::generator
