// Selection sources that choose per layer (oracle, quest) and the attention recall probe on the CPU
// backend: the references the CUDA backend is tested against. Both read the prepared batch
// (PrepareBatch) and index sets (PrepareSparseDecode); a layer's oracle/quest sets replace the
// prepared positions in place.
#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/sparse/attention_recall.h"
#include "core/sparse/quest.h"
#include "core/sparse/selection.h"
#include "core/sparse/selection_source.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// q [n_seqs, n_heads, head_dim] f32 of a prepared decode batch with prepared sets.
absl::Status CheckDecodeQuery(const BatchDesc& batch, const IndexSets& sets, int layer,
                              const Tensor& q, const char* op) {
  RETURN_IF_ERROR(CheckTensor(q, absl::StrCat(op, " q"), DType::kF32, 3));
  RETURN_IF_ERROR(CheckBatch(batch, layer, q.dim(0)));
  if (sets.n_seqs != static_cast<int32_t>(batch.seqs.size()) || q.dim(0) != sets.n_seqs) {
    return absl::FailedPreconditionError(
        absl::StrCat(op, ": PrepareSparseDecode was not called for this batch"));
  }
  if (q.dim(1) % sets.n_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", q.dim(1), " query heads over ", sets.n_kv_heads, " KV heads"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CpuBackend::SelectLayerIndexSets(int layer, const Tensor& q,
                                              const LayerSelectionSpec& spec) {
  constexpr const char* kOp = "layer selection";
  RETURN_IF_ERROR(CheckDecodeQuery(batch_, sparse_sets_, layer, q, kOp));
  if (!IsPerLayerSource(spec.source)) {
    return absl::InvalidArgumentError(absl::StrCat(
        kOp, ": source ", SelectionSourceName(spec.source), " does not select per layer"));
  }
  const int32_t want_sets = spec.mode == SelectionMode::kBatchLevel ? 1 : sparse_sets_.n_kv_heads;
  if (sparse_sets_.sets_per_seq != want_sets) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": prepared sets have ", sparse_sets_.sets_per_seq,
                     " sets per sequence, the selection mode gives ", want_sets));
  }
  const int64_t n_heads = q.dim(1), hd = q.dim(2);
  SelectionOptions so;
  so.budget = std::max(1, sparse_sets_.budget);
  so.sink = std::min(spec.sink, so.budget);
  so.mode = spec.mode;
  so.scale = spec.scale;
  std::vector<SelectionQuery> batch(batch_.seqs.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceKv* kv = batch_.kv[i];
    if (kv->offloaded(layer)) {
      return absl::FailedPreconditionError(
          absl::StrCat(kOp, ": layer ", layer, " of sequence ", i,
                       " is offloaded (per-layer sources need resident layers)"));
    }
    const int32_t set0 = static_cast<int32_t>(i) * sparse_sets_.sets_per_seq;
    batch[i].q =
        Tensor(q.as<float>() + static_cast<int64_t>(i) * n_heads * hd, DType::kF32, {n_heads, hd});
    batch[i].k_cache = kv->k[layer];
    batch[i].len = sparse_sets_.seq_len[i];
    // The prepared size is min(budget, len): a budget of that size reproduces it. A size below the
    // sink is the whole past (len < sink <= budget), which any budget >= len reproduces too.
    const int32_t size = sparse_sets_.indptr[set0 + 1] - sparse_sets_.indptr[set0];
    batch[i].budget = std::max({1, size, so.sink});
  }
  IndexSets chosen;
  if (spec.source == SelectionSource::kOracle) {
    SelectionResult r;
    RETURN_IF_ERROR(SelectTopB(batch, so, &r));
    chosen = std::move(r.sets);
  } else {
    // The layer appended the current token's K (row past_len) before it selects: it joins its
    // page's bound.
    RETURN_IF_ERROR(QuestSelectTopB(batch, so, spec.page_size, /*with_current=*/true, &chosen));
  }
  if (chosen.indptr != sparse_sets_.indptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": the prepared set sizes are not min(budget, past) for ",
                     SelectionSourceName(spec.source)));
  }
  sparse_sets_.indices = std::move(chosen.indices);
  return absl::OkStatus();
}

absl::Status CpuBackend::AttentionRecall(int layer, const Tensor& q, float scale, Tensor* lse) {
  RETURN_IF_ERROR(CheckDecodeQuery(batch_, sparse_sets_, layer, q, "attention recall"));
  std::vector<Tensor> k;
  k.reserve(batch_.kv.size());
  // An offloaded layer's k aliases its plain host copy (the CPU backend's tiers are never
  // interleaved).
  for (const SequenceKv* kv : batch_.kv) k.push_back(kv->k[layer]);
  AttentionRecallArgs a;
  a.sets = &sparse_sets_;
  a.k = k;
  a.q = q;
  a.scale = scale;
  return AttentionRecallCpu(a, lse);
}

}  // namespace specontext
