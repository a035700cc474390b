// KV tiers and sparse decode on the CPU backend: the reference the CUDA ops are tested against.
// Sparse attention and the elastic copies reuse the core/sparse CPU references, so the engine path and the
// algorithm's oracle cannot drift apart.
#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/sparse/elastic.h"
#include "core/sparse/sparse_attention.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// Every sequence of the batch must have `layer` in the same tier: the planner moves layers for all.
absl::Status CheckTier(const BatchDesc& batch, int layer, bool offloaded, const char* op) {
  for (size_t i = 0; i < batch.kv.size(); ++i) {
    const SequenceKv* kv = batch.kv[i];
    if (kv == nullptr || kv->offloaded(layer) != offloaded) {
      return absl::FailedPreconditionError(absl::StrCat(op, ": layer ", layer, " of sequence ", i, " is ",
                                                        offloaded ? "not offloaded" : "offloaded"));
    }
    if (offloaded && (layer >= static_cast<int>(kv->slot_k.size()) || kv->slot_k[layer].empty() ||
                      kv->slot_v[layer].empty() || kv->host_v[layer].empty())) {
      return absl::FailedPreconditionError(
          absl::StrCat(op, ": offloaded layer ", layer, " of sequence ", i, " has no slot buffer"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Tensor> CpuBackend::AllocPinnedHost(DType dtype, Shape shape, MemoryKind kind) {
  return host_memory_->Alloc(dtype, std::move(shape), kind);
}

absl::Status CpuBackend::CopyToPinnedHost(const Tensor& device, Tensor* host) { return ToHost(device, host); }

absl::Status CpuBackend::KvAppendHost(int layer, const Tensor& k, const Tensor& v) {
  RETURN_IF_ERROR(CheckBatch(batch_, layer, k.dim(0)));
  RETURN_IF_ERROR(CheckTier(batch_, layer, /*offloaded=*/true, "kv_append_host"));
  // k/v[layer] alias the host copy (backend.h), so the dense append writes exactly the host rows.
  for (size_t i = 0; i < batch_.kv.size(); ++i) {
    const SequenceKv* kv = batch_.kv[i];
    if (kv->k[layer].data() != kv->host_k[layer].data() || kv->v[layer].data() != kv->host_v[layer].data()) {
      return absl::FailedPreconditionError(
          absl::StrCat("kv_append_host: k/v of offloaded layer ", layer, " do not alias the host copy"));
    }
  }
  return KvAppend(layer, k, v);
}

absl::Status CpuBackend::PrepareSparseDecode(const SparseDecodeDesc& desc) {
  RETURN_IF_ERROR(ValidateSparseDecode(desc, batch_));
  const IndexSets& sets = *desc.sets;
  sparse_sets_ = sets;
  sparse_slots_.assign(desc.slots.begin(), desc.slots.end());
  dense_resident_sets_.n_seqs = 0;
  if (std::find(desc.dense_resident.begin(), desc.dense_resident.end(), 1) == desc.dense_resident.end()) {
    return absl::OkStatus();
  }
  // The reference of the per-sequence fallback: the flagged sequences' sets are every past position.
  int32_t budget = sets.budget;
  for (int32_t i = 0; i < sets.n_seqs; ++i) {
    if (desc.dense_resident[i] != 0) budget = std::max(budget, sets.seq_len[i]);
  }
  IndexSets& d = dense_resident_sets_;
  d.Reset(sets.n_seqs, sets.n_kv_heads, sets.sets_per_seq, budget);
  d.seq_len = sets.seq_len;
  for (int32_t i = 0; i < sets.n_seqs; ++i) {
    for (int32_t k = 0; k < sets.sets_per_seq; ++k) {
      if (desc.dense_resident[i] != 0) {
        for (int32_t p = 0; p < sets.seq_len[i]; ++p) d.indices.push_back(p);
      } else {
        const std::span<const int32_t> p = sets.SetPositions(i * sets.sets_per_seq + k);
        d.indices.insert(d.indices.end(), p.begin(), p.end());
      }
      d.indptr.push_back(static_cast<int32_t>(d.indices.size()));
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::ElasticLoad(int layer, const CopyList& copies, ElasticCounters* counters) {
  RETURN_IF_ERROR(CheckBatch(batch_, layer, batch_.n_tokens));
  RETURN_IF_ERROR(CheckTier(batch_, layer, /*offloaded=*/true, "elastic_load"));
  std::vector<LayerRows> rows;
  rows.reserve(batch_.kv.size());
  for (const SequenceKv* kv : batch_.kv) {
    rows.push_back({kv->host_k[layer], kv->host_v[layer], kv->slot_k[layer], kv->slot_v[layer]});
  }
  return ExecuteCopiesCpu(copies, rows, counters);
}

absl::Status CpuBackend::SparseAttention(int layer, const Tensor& q, const Tensor& k_cur, const Tensor& v_cur,
                                         float scale, Tensor* out) {
  RETURN_IF_ERROR(CheckTensor(q, "sparse attention q", DType::kF32, 3));
  RETURN_IF_ERROR(CheckSameShape(q, *out, "sparse attention q/out"));
  RETURN_IF_ERROR(CheckBatch(batch_, layer, q.dim(0)));
  if (sparse_sets_.n_seqs != static_cast<int32_t>(batch_.seqs.size()) || q.dim(0) != sparse_sets_.n_seqs) {
    return absl::FailedPreconditionError("sparse attention: PrepareSparseDecode was not called for this batch");
  }
  const bool offloaded = !batch_.kv.empty() && batch_.kv[0]->offloaded(layer);
  RETURN_IF_ERROR(CheckTier(batch_, layer, offloaded, "sparse attention"));
  if (offloaded && sparse_slots_.size() != sparse_sets_.indices.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat("sparse attention: offloaded layer ", layer, " but the prepared batch has no slots"));
  }
  std::vector<SparseKvView> views;
  views.reserve(batch_.kv.size());
  for (const SequenceKv* kv : batch_.kv) {
    if (offloaded) {
      views.push_back({kv->slot_k[layer], kv->slot_v[layer]});
    } else {
      views.push_back({kv->k[layer], kv->v[layer]});
    }
  }
  SparseAttentionArgs args;
  args.sets = &sparse_sets_;
  if (offloaded) {
    args.slots = sparse_slots_;
  } else if (dense_resident_sets_.n_seqs > 0) {
    args.sets = &dense_resident_sets_;
  }
  args.kv = views;
  args.q = q;
  args.k_cur = k_cur;
  args.v_cur = v_cur;
  args.scale = scale;
  return SparseAttentionCpu(args, out);
}

}  // namespace specontext
