// CudaBackend: ElasticLoad (gather of changed rows on the copy stream) and SparseAttention (decode over
// index sets). Stream ordering is described in cuda_sparse.cc.
#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/cuda_sparse_state.h"
#include "core/status_macros.h"

namespace specontext::cuda {
namespace {

bool SameList(const CudaBackend::SparseState& sp, const CopyList& cl) {
  if (sp.last_sets_per_seq != cl.sets_per_seq || sp.last_copies.size() != cl.copies.size() ||
      sp.last_ptr != cl.copy_ptr) {
    return false;
  }
  // The decoder passes one list object to every offloaded layer of a step: within one PrepareSparseDecode
  // that object is the list already uploaded (comparing 600 KB per layer again cost ~0.05 ms a layer).
  if (sp.sets_valid && &cl == sp.last_list && sp.last_list_epoch == sp.decode_epoch) return true;
  return cl.copies.empty() ||
         std::memcmp(sp.last_copies.data(), cl.copies.data(), sizeof(RowCopy) * cl.copies.size()) == 0;
}

// Whether `layer` reads its host rows from the allocation of `begin` (a layer group, SequenceKv "Host
// layout") for every sequence: its rows sit (layer - begin) K/V pairs after those of `begin`, at the same
// pitch. No other allocation can start inside that one, so equal addresses mean the same allocation.
bool SameHostGroup(const std::vector<ElasticSeqPtrs>& tab, int n_seqs, int begin, int layer, int64_t row_bytes) {
  for (int i = 0; i < n_seqs; ++i) {
    const ElasticSeqPtrs &a = tab[size_t(begin) * n_seqs + i], &b = tab[size_t(layer) * n_seqs + i];
    if (b.host_row_pitch != a.host_row_pitch || (layer - begin + 1) * 2 * row_bytes > a.host_row_pitch ||
        static_cast<const char*>(b.host_k) != static_cast<const char*>(a.host_k) + (layer - begin) * 2 * row_bytes) {
      return false;
    }
  }
  return true;
}

// SparseAttention's split-K partials for rows = n_seqs x n_kv x max_splits x group: O [rows, head_dim] f32
// (normalised), then LSE [rows] f32 at SparsePartialsLseOffset.
size_t SparsePartialsLseOffset(size_t rows, int head_dim) { return Align16Bytes(rows * head_dim * sizeof(float)); }
size_t SparsePartialsBytes(size_t rows, int head_dim) {
  return SparsePartialsLseOffset(rows, head_dim) + rows * sizeof(float);
}

}  // namespace

absl::Status EnsureLayerEvents(CudaBackend::SparseState* sp, int n_layers) {
  for (auto* v : {&sp->load_done, &sp->attn_done, &sp->append_done}) {
    while (static_cast<int>(v->size()) < n_layers) {
      cudaEvent_t e = nullptr;
      RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      v->push_back(e);
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::ElasticLoad(int layer, const CopyList& cl, ElasticCounters* counters) {
  return ElasticLoadLayers(layer, 1, cl, counters);
}

absl::Status CudaBackend::ElasticLoadLayers(int first, int count, const CopyList& cl, ElasticCounters* counters) {
  if (!batch_valid_) return absl::FailedPreconditionError("elastic_load: PrepareBatch was not called");
  if (count < 1 || first < 0 || first + count > n_layers_) {
    return absl::InvalidArgumentError(
        absl::StrCat("elastic_load: layers [", first, ", ", first + count, ") out of range [0, ", n_layers_, ")"));
  }
  for (int layer = first; layer < first + count; ++layer) {
    RETURN_IF_ERROR(CheckSparseTier(batch_, layer, /*offloaded=*/true, "elastic_load"));
  }
  const int n_seqs = static_cast<int>(batch_.kv.size());
  if (cl.n_seqs != n_seqs || cl.n_kv_heads != n_kv_ || (cl.sets_per_seq != 1 && cl.sets_per_seq != n_kv_) ||
      static_cast<int64_t>(cl.copy_ptr.size()) != int64_t{cl.n_seqs} * cl.sets_per_seq + 1 || cl.copy_ptr[0] != 0 ||
      cl.copy_ptr.back() != static_cast<int64_t>(cl.copies.size())) {
    return absl::InvalidArgumentError(absl::StrCat("elastic_load: copy list of ", cl.n_seqs, " sequences, ",
                                                   cl.n_kv_heads, " KV heads, ", cl.sets_per_seq,
                                                   " sets per sequence, ", cl.copy_ptr.size(),
                                                   " pointers does not fit the batch (", n_seqs, " sequences, ",
                                                   n_kv_, " KV heads)"));
  }
  for (size_t s = 0; s + 1 < cl.copy_ptr.size(); ++s) {
    if (cl.copy_ptr[s + 1] < cl.copy_ptr[s]) return absl::InvalidArgumentError("elastic_load: copy_ptr decreases");
  }
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  RETURN_IF_ERROR(EnsureLayerEvents(sp, n_layers_));
  for (int layer = first; layer < first + count; ++layer) RETURN_IF_ERROR(EnsureTierTables(layer));
  const bool same = SameList(*sp, cl);
  if (!same) {
    // Records straight into the pinned staging buffer, with the per-sequence bounds, in one pass.
    const size_t bytes = std::max<size_t>(16, sizeof(ElasticCopy) * cl.copies.size());
    ASSIGN_OR_RETURN(char* host, StagingReserve(sp->copy_staging, bytes));
    ElasticCopy* recs = reinterpret_cast<ElasticCopy*>(host);
    sp->last_ptr.clear();  // until the upload below is queued, no list is known to be on the device
    sp->max_token.assign(n_seqs, -1);
    sp->max_slot.assign(n_seqs, -1);
    for (int32_t set = 0; set < n_seqs * cl.sets_per_seq; ++set) {
      const int seq = set / cl.sets_per_seq;
      int32_t lo = 0, max_token = sp->max_token[seq], max_slot = sp->max_slot[seq];
      for (int32_t c = cl.copy_ptr[set]; c < cl.copy_ptr[set + 1]; ++c) {
        const RowCopy rc = cl.copies[c];
        lo = std::min({lo, rc.token, rc.slot});
        max_token = std::max(max_token, rc.token);
        max_slot = std::max(max_slot, rc.slot);
        recs[c] = {rc.token, rc.slot, set, 0};
      }
      if (lo < 0) {
        for (int32_t c = cl.copy_ptr[set]; c < cl.copy_ptr[set + 1]; ++c) {
          const RowCopy& rc = cl.copies[c];
          if (rc.token < 0 || rc.slot < 0) {
            return absl::InvalidArgumentError(absl::StrCat("elastic_load: seq ", seq, " copy token ", rc.token,
                                                           " -> slot ", rc.slot, " is negative"));
          }
        }
      }
      sp->max_token[seq] = max_token;
      sp->max_slot[seq] = max_slot;
    }
    // Upload on the copy stream: ordered after the previous gathers that read the old list.
    RETURN_IF_ERROR(EnsureDeviceBuffer(*memory_, &sp->copies_buf, bytes, MemoryKind::kPrefetch));
    RETURN_IF_ERROR(StagingCommit(sp->copy_staging, sizeof(ElasticCopy) * cl.copies.size(), sp->copies_buf.data(),
                                  sp->copy));
    sp->last_ptr = cl.copy_ptr;
    sp->last_copies = cl.copies;
    sp->last_sets_per_seq = cl.sets_per_seq;
    sp->n_copies = static_cast<int64_t>(cl.copies.size());
  }
  sp->last_list = &cl;
  sp->last_list_epoch = sp->decode_epoch;
  // Bounds against the layers' tensors (per sequence maxima: O(n_seqs) per layer).
  for (int layer = first; layer < first + count; ++layer) {
    for (int i = 0; i < n_seqs; ++i) {
      const ElasticSeqPtrs& e = sp->elastic_tab[size_t(layer) * n_seqs + i];
      if (sp->max_token[i] >= e.capacity || sp->max_slot[i] >= e.slots) {
        sp->last_ptr.clear();  // force a re-check next time
        return absl::InvalidArgumentError(absl::StrCat("elastic_load: layer ", layer, " seq ", i, " copies up to token ",
                                                       sp->max_token[i], " -> slot ", sp->max_slot[i],
                                                       " outside capacity ", e.capacity, " / slots ", e.slots));
      }
    }
  }
  const int64_t row_bytes = int64_t{head_dim_} * 2;
  if (row_bytes % 16 != 0) {
    return absl::UnimplementedError(absl::StrCat("elastic_load: head_dim ", head_dim_, " is not a multiple of 8"));
  }
  // One gather per run of layers that share a host allocation (SequenceKv "Host layout": layer groups), so
  // that a token's rows of the run are read from one place; each layer of it waits for the run.
  for (int begin = first; begin < first + count;) {
    int end = begin + 1;
    while (end < first + count && SameHostGroup(sp->elastic_tab, n_seqs, begin, end, row_bytes)) ++end;
    for (int layer = begin; layer < end; ++layer) {
      // (a) the previous step's attention of the layer read the slots being overwritten; (b) appends of the
      // layer's new rows to the host copy; the tables.
      RETURN_IF_ERROR(ReadLoadTiming(sp, layer, counters));  // the previous step's load of this layer
      RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(sp->copy, sp->attn_done[layer], 0));
      RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(sp->copy, sp->append_done[layer], 0));
    }
    RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(sp->copy, sp->tables_ready, 0));
    RETURN_IF_ERROR(RecordLoadStart(sp, begin));
    ElasticGatherParams p;
    p.copies = static_cast<const ElasticCopy*>(sp->copies_buf.data());
    p.seqs = reinterpret_cast<const ElasticSeqPtrs*>(static_cast<const char*>(sp->tables.data()) + sp->off_elastic) +
             size_t(begin) * n_seqs;
    p.n_copies = sp->n_copies;
    p.sets_per_seq = cl.sets_per_seq;
    p.n_kv = n_kv_;
    p.n_seqs = n_seqs;
    p.n_layers = end - begin;
    p.row_bytes = row_bytes;
    RETURN_IF_CUDA_ERROR(LaunchElasticGather(p, sm_count_, sp->copy));
    RETURN_IF_ERROR(RecordLoadEnd(sp, begin, end - begin));
    for (int layer = begin; layer < end; ++layer) {
      RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->load_done[layer], sp->copy));
    }
    begin = end;
  }
  if (counters != nullptr) {
    counters->rows_loaded += 2 * cl.head_rows * count;
    counters->bytes_loaded += 2 * cl.head_rows * row_bytes * count;
    counters->bytes_full_reload += 2 * cl.full_reload_rows * row_bytes * count;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::SparseAttention(int layer, const Tensor& q, const Tensor& k_cur, const Tensor& v_cur,
                                          float scale, Tensor* out) {
  if (!batch_valid_) return absl::FailedPreconditionError("sparse attention: PrepareBatch was not called");
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  const int n_seqs = static_cast<int>(batch_.seqs.size());
  if (!sp->sets_valid || sp->n_seqs != n_seqs) {
    return absl::FailedPreconditionError("sparse attention: PrepareSparseDecode was not called for this batch");
  }
  if (layer < 0 || layer >= n_layers_) {
    return absl::InvalidArgumentError(absl::StrCat("sparse attention: layer ", layer, " out of range"));
  }
  if (out == nullptr) return absl::InvalidArgumentError("sparse attention: no output");
  const int64_t n_heads = q.ndim() == 3 ? q.dim(1) : 0;
  if (n_heads == 0 || n_heads % n_kv_ != 0) {
    return absl::InvalidArgumentError(absl::StrCat("sparse attention: q ", q.DebugString(), " does not fit ", n_kv_,
                                                   " KV heads"));
  }
  RETURN_IF_ERROR(CheckSparseBf16(q, "q", n_seqs, n_heads, head_dim_));
  RETURN_IF_ERROR(CheckSparseBf16(*out, "out", n_seqs, n_heads, head_dim_));
  RETURN_IF_ERROR(CheckSparseBf16(k_cur, "k_cur", n_seqs, n_kv_, head_dim_));
  RETURN_IF_ERROR(CheckSparseBf16(v_cur, "v_cur", n_seqs, n_kv_, head_dim_));
  const int group = static_cast<int>(n_heads / n_kv_);
  if (group > kSparseMaxGroup || head_dim_ > kSparseMaxHeadDim || head_dim_ % 8 != 0) {
    return absl::UnimplementedError(absl::StrCat("sparse attention: group ", group, " (max ", kSparseMaxGroup,
                                                 ") or head_dim ", head_dim_, " (max ", kSparseMaxHeadDim,
                                                 ", multiple of 8) not supported"));
  }
  const bool offloaded = batch_.kv[0]->offloaded(layer);
  RETURN_IF_ERROR(CheckSparseTier(batch_, layer, offloaded, "sparse attention"));
  if (offloaded && !sp->has_slots) {
    return absl::FailedPreconditionError(
        absl::StrCat("sparse attention: offloaded layer ", layer, " but the prepared batch has no slots"));
  }
  RETURN_IF_ERROR(EnsureLayerEvents(sp, n_layers_));
  RETURN_IF_ERROR(EnsureTierTables(layer));

  SparseAttnParams p;
  p.q = q.data();
  p.k_cur = k_cur.data();
  p.v_cur = v_cur.data();
  p.out = out->data();
  p.kv = static_cast<const SparseKvPtrs*>(sp->tables.data()) + size_t(layer) * n_seqs;
  const char* sets = static_cast<const char*>(sp->sets_buf.data());
  p.indptr = reinterpret_cast<const int32_t*>(sets);
  p.rows = reinterpret_cast<const int32_t*>(sets + (offloaded ? sp->off_slots : sp->off_pos));
  // The weak-retrieval fallback's sequences read their whole past in resident layers (SparseAttnParams::
  // dense_len); an offloaded layer reads every sequence's set from its slot buffer.
  const bool dense = sp->has_dense && !offloaded;
  if (dense) p.dense_len = reinterpret_cast<const int32_t*>(sets + sp->off_dense);
  p.sets_per_seq = sp->sets_per_seq;
  p.n_seqs = n_seqs;
  p.n_heads = static_cast<int>(n_heads);
  p.n_kv = n_kv_;
  p.head_dim = head_dim_;
  p.scale = scale;
  // Split-K over the (sequence, KV head) lists: the kernel file owns the plan (the benchmark uses it too).
  // Batch-invariant mode: a fixed chunk, so a list's splits do not depend on the other lists.
  if (batch_invariant_) {
    PlanSparseAttentionInvariant(dense ? sp->dense_max_keys : sp->max_keys, &p);
  } else {
    PlanSparseAttention(dense ? sp->dense_sum_keys : sp->sum_keys, dense ? sp->dense_max_keys : sp->max_keys,
                        sm_count_, &p);
  }
  if (p.max_splits > 1) {
    const size_t rows = size_t(n_seqs) * n_kv_ * p.max_splits * group;
    RETURN_IF_ERROR(EnsureBuffer(&sp->partials, SparsePartialsBytes(rows, head_dim_)));
    p.partial_o = sp->partials.as<float>();
    p.partial_lse = reinterpret_cast<float*>(static_cast<char*>(sp->partials.data()) +
                                             SparsePartialsLseOffset(rows, head_dim_));
  }
  // An offloaded layer waits only for its own load (an event never recorded is complete).
  if (offloaded) RETURN_IF_ERROR(WaitForElasticLoad(sp, stream_, layer, capturing_));
  RETURN_IF_CUDA_ERROR(LaunchSparseAttention(p, stream_));
  RETURN_IF_CUDA_ERROR(RecordEvent(sp->attn_done[layer], stream_, capturing_));
  return absl::OkStatus();
}

// sp->sets_buf, sp->tables and sp->partials at their largest for the steps of `s`, each as EnsureDeviceBuffer
// grows it.
int64_t CudaBackend::SparseAttentionWorkspaceBytes(const AttentionWorkspaceShape& s) const {
  if (s.budget <= 0 || s.n_heads <= 0 || s.n_kv_heads <= 0 || s.head_dim <= 0) return 0;
  auto bound = [](size_t most) { return AllocationBoundBytes(static_cast<int64_t>(GrownBufferBoundBytes(most))); };
  const size_t seqs = static_cast<size_t>(std::max(1, s.max_seqs));
  const int32_t set_len = s.max_context > 0 ? std::min(s.budget, s.max_context) : s.budget;
  // sets_buf: a host upload of the positions (PrepareSparseDecode) or a started selection's (StartSelectIndexSets).
  const size_t n_sets = seqs * std::max(1, s.sets_per_seq), n_idx = n_sets * set_len;
  const size_t q_heads = static_cast<size_t>(s.select_q_heads > 0 ? s.select_q_heads : s.n_heads);
  int64_t bytes = bound(std::max(SetsUploadLayoutOf(n_sets + 1, n_idx, true, s.dense_fallback, seqs).total,
                                 SelectLayoutOf(n_sets + 1, n_idx, seqs * q_heads).bytes));
  // sp->tables (kPrefetch: the copy stream reads them), where every layer's K/V of every sequence are.
  bytes += bound(TierTablesLayoutOf(std::max(0, s.n_layers), seqs).total);
  const int n_kv = s.n_kv_heads, hd = s.head_dim, group = s.n_heads / n_kv;
  if (group < 1 || group > kSparseMaxGroup || hd > kSparseMaxHeadDim || hd % 8 != 0) return bytes;  // refused
  // The split count of the plan of the current batch-invariant mode (set before the planner measures) for the
  // longest (sequence, KV head) list: a set and the current token (any length up to budget + 1: the plan's
  // ceiling) or, for a sequence flagged dense_resident (resident layers), its whole past and the current token
  // rounded up to kDensePlanKeys (PrepareSparseDecode), each multiple up to max_context + 1: the plan's largest
  // pick over the batches, from n_kv such lists (that sequence alone) to n_kv lists of it per sequence.
  int splits = SparseAttentionSplitsCeiling(int64_t{s.budget} + 1, batch_invariant_);
  if (s.dense_fallback) {
    constexpr int64_t q = SparseState::kDensePlanKeys;
    SparseAttnParams shape;
    shape.n_heads = s.n_heads;
    shape.n_kv = n_kv;
    shape.head_dim = hd;
    for (int64_t keys = q; keys < int64_t{s.max_context} + 1 + q; keys += q) {
      splits = std::max(splits, SparseAttentionMaxSplits(keys, n_kv, static_cast<int64_t>(seqs) * n_kv, sm_count_,
                                                         batch_invariant_, shape));
    }
  }
  if (splits > 1) bytes += bound(SparsePartialsBytes(seqs * n_kv * splits * group, hd));
  return bytes;
}

}  // namespace specontext::cuda
