// CudaBackend: per-layer selection sources (oracle, quest) and the attention recall probe, all on
// the compute stream with nothing uploaded per layer: the kernels read the layer's KV through the
// batch metadata PrepareBatch uploaded (AttnSeq and K pointers per layer and sequence) and the
// index sets PrepareSparseDecode left in the sparse state's set buffer, whose positions the
// per-layer selection rewrites in place (the layer's SparseAttention reads them next, in stream
// order). The oracle reuses the head selection's kernels (LaunchSelection) on a per-sequence table
// built on the device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/cuda_sparse_state.h"
#include "core/cuda/kernels/layer_selection_kernels.h"
#include "core/sparse/selection_source.h"
#include "core/status_macros.h"

namespace specontext::cuda {
namespace {

size_t Align256(size_t v) { return (v + 255) / 256 * 256; }

}  // namespace

absl::StatusOr<CudaBackend::LayerOpContext> CudaBackend::CheckLayerOp(const char* op, int layer,
                                                                      const Tensor& q) {
  if (!batch_valid_)
    return absl::FailedPreconditionError(absl::StrCat(op, ": PrepareBatch was not called"));
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  const int n_seqs = static_cast<int>(batch_.seqs.size());
  if (!sp->sets_valid || sp->n_seqs != n_seqs) {
    return absl::FailedPreconditionError(
        absl::StrCat(op, ": PrepareSparseDecode was not called for this batch"));
  }
  if (layer < 0 || layer >= n_layers_)
    return absl::InvalidArgumentError(absl::StrCat(op, ": layer ", layer, " out of range"));
  const int64_t n_heads = q.ndim() == 3 ? q.dim(1) : 0;
  if (n_heads == 0 || n_heads % n_kv_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": q ", q.DebugString(), " does not fit ", n_kv_, " KV heads"));
  }
  RETURN_IF_ERROR(CheckSparseBf16(q, absl::StrCat(op, " q").c_str(), n_seqs, n_heads, head_dim_));
  return LayerOpContext{sp, n_heads};
}

absl::Status CudaBackend::SelectLayerIndexSets(int layer, const Tensor& q,
                                               const LayerSelectionSpec& spec) {
  constexpr const char* kOp = "layer selection";
  ASSIGN_OR_RETURN(const LayerOpContext ctx, CheckLayerOp(kOp, layer, q));
  if (!IsPerLayerSource(spec.source)) {
    return absl::InvalidArgumentError(absl::StrCat(
        kOp, ": source ", SelectionSourceName(spec.source), " does not select per layer"));
  }
  SparseState* sp = ctx.sp;
  const int64_t n_heads = ctx.n_heads;
  const int n_seqs = static_cast<int>(batch_.seqs.size());
  const int want_sets = spec.mode == SelectionMode::kBatchLevel ? 1 : n_kv_;
  if (sp->sets_per_seq != want_sets) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": prepared sets have ", sp->sets_per_seq,
                                                   " sets per sequence, the selection mode gives ",
                                                   want_sets));
  }
  for (int i = 0; i < n_seqs; ++i) {
    if (batch_.kv[i]->offloaded(layer)) {
      return absl::FailedPreconditionError(
          absl::StrCat(kOp, ": layer ", layer, " of sequence ", i,
                       " is offloaded (per-layer sources need resident layers)"));
    }
  }
  int max_len = 0;
  for (int i = 0; i < n_seqs; ++i) {
    const int32_t b = sp->host_indptr[i * sp->sets_per_seq],
                  size = sp->host_indptr[i * sp->sets_per_seq + 1] - b;
    const int32_t len = batch_.seqs[i].past_len;
    for (int s = 1; s < sp->sets_per_seq;
         ++s) {  // every set of a sequence has the size of its first
      if (sp->host_indptr[i * sp->sets_per_seq + s + 1] -
              sp->host_indptr[i * sp->sets_per_seq + s] !=
          size) {
        return absl::InvalidArgumentError(
            absl::StrCat(kOp, ": sequence ", i, "'s prepared sets differ in size"));
      }
    }
    if (size > len)
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": a set of ", size, " of ", len, " past tokens"));
    max_len = std::max(max_len, len);
  }
  const char* meta = static_cast<const char*>(meta_.data());
  const AttnSeq* seqs = reinterpret_cast<const AttnSeq*>(meta) + size_t(layer) * n_seqs;
  const void* const* k_ptrs =
      reinterpret_cast<const void* const*>(meta + off_k_ptrs_) + size_t(layer) * n_seqs;
  char* sets = static_cast<char*>(sp->sets_buf.data());
  const int32_t* indptr = reinterpret_cast<const int32_t*>(sets);
  int32_t* positions = reinterpret_cast<int32_t*>(sets + sp->off_pos);
  const int group = static_cast<int>(n_heads / n_kv_);
  const bool batch_level = spec.mode == SelectionMode::kBatchLevel;

  if (spec.source == SelectionSource::kQuest) {
    QuestParams p;
    p.q = q.data();
    p.seqs = seqs;
    p.k_ptrs = k_ptrs;
    p.indptr = indptr;
    p.positions = positions;
    p.n_seqs = n_seqs;
    p.n_q = static_cast<int>(n_heads);
    p.n_kv = n_kv_;
    p.head_dim = head_dim_;
    p.sets_per_seq = sp->sets_per_seq;
    p.heads_per_set = batch_level ? static_cast<int>(n_heads) : group;
    p.page_size = spec.page_size;
    p.sink = spec.sink;
    p.max_pages = spec.page_size > 0 ? (max_len + 1 + spec.page_size - 1) / spec.page_size : 0;
    RETURN_IF_ERROR(
        EnsureBuffer(&sp->layer_work,
                     sizeof(float) * std::max<size_t>(1, size_t(n_seqs) * n_heads * p.max_pages)));
    p.page_scores = sp->layer_work.as<float>();
    RETURN_IF_CUDA_ERROR(LaunchQuestSelection(p, stream_));
    return absl::OkStatus();
  }
  // Oracle: [table][logits][stats][combined][mass][flag] in one work buffer.
  const size_t b_table = Align256(sizeof(SelSeq) * n_seqs);
  const size_t b_logits = Align256(sizeof(float) * size_t(n_seqs) * n_heads * max_len);
  const size_t b_stats =
      Align256(sizeof(float) * SelectionStatsFloats(n_seqs, static_cast<int>(n_heads), max_len));
  const size_t b_comb = Align256(sizeof(float) * size_t(n_seqs) * sp->sets_per_seq * max_len);
  const size_t b_mass = Align256(sizeof(float) * size_t(n_seqs) * n_heads);
  RETURN_IF_ERROR(
      EnsureBuffer(&sp->layer_work, b_table + b_logits + b_stats + b_comb + b_mass + 256));
  char* work = static_cast<char*>(sp->layer_work.data());
  LayerSelSeqsParams t;
  t.q = q.data();
  t.seqs = seqs;
  t.k_ptrs = k_ptrs;
  t.indptr = indptr;
  t.n_seqs = n_seqs;
  t.n_q = static_cast<int>(n_heads);
  t.head_dim = head_dim_;
  t.sets_per_seq = sp->sets_per_seq;
  t.sink = spec.sink;
  t.out = reinterpret_cast<SelSeq*>(work);
  RETURN_IF_CUDA_ERROR(LaunchBuildLayerSelSeqs(t, stream_));
  SelectionParams p;
  p.seqs = t.out;
  p.n_seqs = n_seqs;
  p.n_q = static_cast<int>(n_heads);
  p.n_kv = n_kv_;
  p.head_dim = head_dim_;
  p.sets_per_seq = sp->sets_per_seq;
  p.heads_per_set = batch_level ? static_cast<int>(n_heads) : group;
  p.max_len = max_len;
  p.scale = spec.scale != 0.0f ? spec.scale : 1.0f / std::sqrt(static_cast<float>(head_dim_));
  p.q_bf16 = true;
  p.k_bf16 = true;
  p.logits = reinterpret_cast<float*>(work + b_table);
  p.stats = reinterpret_cast<float*>(work + b_table + b_logits);
  p.combined = reinterpret_cast<float*>(work + b_table + b_logits + b_stats);
  p.indices = positions;
  p.mass = reinterpret_cast<float*>(work + b_table + b_logits + b_stats + b_comb);
  // A non-finite score is flagged here and not read back (the host never waits for these sets): NaN
  // logits show it downstream.
  p.error_flag = reinterpret_cast<int*>(work + b_table + b_logits + b_stats + b_comb + b_mass);
  RETURN_IF_CUDA_ERROR(LaunchSelection(p, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::AttentionRecall(int layer, const Tensor& q, float scale, Tensor* lse) {
  constexpr const char* kOp = "attention recall";
  ASSIGN_OR_RETURN(const LayerOpContext ctx, CheckLayerOp(kOp, layer, q));
  SparseState* sp = ctx.sp;
  const int64_t n_heads = ctx.n_heads;
  const int n_seqs = static_cast<int>(batch_.seqs.size());
  if (lse == nullptr || lse->dtype() != DType::kF32 || lse->device() != DeviceKind::kCuda ||
      lse->shape() != Shape{n_seqs, n_heads, 2}) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": lse must be f32@cuda [", n_seqs, ", ", n_heads, ", 2]"));
  }
  const char* meta = static_cast<const char*>(meta_.data());
  const char* sets = static_cast<const char*>(sp->sets_buf.data());
  RecallParams p;
  p.q = q.data();
  p.seqs = reinterpret_cast<const AttnSeq*>(meta) + size_t(layer) * n_seqs;
  p.k_ptrs = reinterpret_cast<const void* const*>(meta + off_k_ptrs_) + size_t(layer) * n_seqs;
  p.indptr = reinterpret_cast<const int32_t*>(sets);
  p.positions = reinterpret_cast<const int32_t*>(sets + sp->off_pos);
  p.out = lse->as<float>();
  p.n_seqs = n_seqs;
  p.n_heads = static_cast<int>(n_heads);
  p.n_kv = n_kv_;
  p.head_dim = head_dim_;
  p.sets_per_seq = sp->sets_per_seq;
  p.scale = scale;
  // An offloaded layer's rows are in mapped host memory, written by KvAppendHost on this stream: in
  // order.
  RETURN_IF_CUDA_ERROR(LaunchAttentionRecall(p, stream_));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> CudaBackend::PreparedPositions() {
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  if (!sp->sets_valid || sp->host_indptr.empty())
    return absl::FailedPreconditionError("no prepared index sets");
  std::vector<int32_t> out(sp->host_indptr.back());
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  if (!out.empty()) {
    RETURN_IF_CUDA_ERROR(cudaMemcpy(out.data(),
                                    static_cast<const char*>(sp->sets_buf.data()) + sp->off_pos,
                                    sizeof(int32_t) * out.size(), cudaMemcpyDeviceToHost));
  }
  return out;
}

}  // namespace specontext::cuda
