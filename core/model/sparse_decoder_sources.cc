// SparseDecoder: where a decode step's index sets come from (SparseOptions::source), the
// weak-retrieval fallback and the attention recall probe (docs/sparse.md "Selection sources").
#include <algorithm>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/model/sparse_decoder.h"
#include "core/model/sparse_decoder_state.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// A view of `t`'s storage from element `offset` with `shape` (no copy).
Tensor View(const Tensor& t, int64_t offset, Shape shape) {
  return Tensor(static_cast<char*>(t.data()) + offset * DTypeSize(t.dtype()), t.dtype(),
                std::move(shape), t.device(), t.storage());
}

}  // namespace

absl::Status SparseDecoder::SelectWithHead(std::span<const ForwardSeq> fwd,
                                           std::span<SeqState* const> states, const Tensor& q,
                                           SparseForward* sf) {
  const int64_t nq = head_->n_heads(), hd = head_->head_dim();
  queries_.resize(fwd.size());
  for (size_t i = 0; i < fwd.size(); ++i) {
    queries_[i].q = SelectionPart(View(q, static_cast<int64_t>(i) * nq * hd, {nq, hd}));
    queries_[i].k_cache = SelectionPart(states[i]->cache);
    queries_[i].len = fwd[i].past_len;
    queries_[i].budget = states[i]->budget;
  }
  SelectionOptions so;
  so.budget = options_.budget;
  so.sink = options_.sink;
  so.mode = options_.mode;
  // The benchmark's synthetic rewrite and the weak-retrieval fallback need the sets (or their mass)
  // on the host before the forward; otherwise the positions may stay on the device until the host
  // needs them (the elastic plan, after the forward). SPC_DEFER_SELECTION=0 waits for the sets
  // before the forward (A/B).
  static const bool kDefer = [] {
    const char* e = std::getenv("SPC_DEFER_SELECTION");
    return e == nullptr || std::string(e) != "0";
  }();
  Backend& b = *model_->backend();
  const bool fallback = options_.fallback_mass > 0;
  const bool defer = kDefer && options_.defer_selection && !synthetic_.has_value() && !fallback;
  if (defer) {
    RETURN_IF_ERROR(b.StartSelectIndexSets(queries_.data(), queries_.size(), so, &selection_));
  } else {
    RETURN_IF_ERROR(b.SelectIndexSets(queries_.data(), queries_.size(), so, &selection_));
  }
  if (!selection_.pending) RETURN_IF_ERROR(TakeSelection());
  weak_.clear();
  if (fallback) {
    // Weak retrieval, per sequence: a sequence whose head kept less than the threshold of its own attention
    // mass (mean over its query heads) attends to every past position in the resident layers; the others keep
    // their sets. A per-sequence flag (SparseDecodeDesc::dense_resident) rather than a step-wide dense
    // attention: one weak sequence of 64 must not make the step dense for all, and the flag changes neither
    // the sets (the elastic plan and the offloaded layers keep the head's) nor the step graph's variant.
    // Under TP a rank holds only its query heads' mass: the ranks add theirs (one all-reduce) and every rank
    // divides the same sums by the whole head's query heads, so all take the same decisions and their
    // forwards stay in lockstep.
    const size_t nqh = static_cast<size_t>(selection_.n_q_heads);
    int64_t n_weak = 0;
    weak_.assign(fwd.size(), 0);
    if (model_->tensor_parallel().size > 1) {
      RETURN_IF_ERROR(SumMassOverRanks(fwd.size()));
      const double all_heads = static_cast<double>(head_->n_heads());
      for (size_t i = 0; i < fwd.size(); ++i) {
        weak_[i] = static_cast<double>(seq_mass_[i]) / all_heads < options_.fallback_mass ? 1 : 0;
        n_weak += weak_[i];
      }
    } else {
      for (size_t i = 0; i < fwd.size() && nqh > 0; ++i) {
        double mass = 0;
        for (size_t h = 0; h < nqh; ++h) mass += selection_.captured_mass[i * nqh + h];
        weak_[i] = mass / static_cast<double>(nqh) < options_.fallback_mass ? 1 : 0;
        n_weak += weak_[i];
      }
    }
    if (n_weak > 0) {
      ++stats_.weak_retrieval_fallback_steps;
      stats_.weak_retrieval_fallback_sequences += n_weak;
      sf->desc.dense_resident = weak_;
    } else {
      weak_.clear();
    }
  }
  return absl::OkStatus();
}

absl::Status SparseDecoder::SumMassOverRanks(size_t n_seqs) {
  const TensorParallel& tp = model_->tensor_parallel();
  const size_t nqh = static_cast<size_t>(selection_.n_q_heads);
  if (selection_.captured_mass.size() != n_seqs * nqh) {
    return absl::InternalError(absl::StrCat("captured mass has ", selection_.captured_mass.size(), " values for ",
                                            n_seqs, " sequences of ", nqh, " query heads"));
  }
  // Head-level: captured_mass holds the rank's query heads only. Batch-level: every rank scored every query
  // head; each adds its share [rank * nqh / N, (rank + 1) * nqh / N) so that the sum counts each head once.
  size_t h0 = 0, h1 = nqh;
  if (options_.mode != SelectionMode::kHeadLevel) {
    h0 = static_cast<size_t>(tp.rank) * nqh / tp.size;
    h1 = static_cast<size_t>(tp.rank + 1) * nqh / tp.size;
  }
  seq_mass_.assign(n_seqs, 0.0f);
  for (size_t i = 0; i < n_seqs; ++i) {
    double mass = 0;
    for (size_t h = h0; h < h1; ++h) mass += selection_.captured_mass[i * nqh + h];
    seq_mass_[i] = static_cast<float>(mass);
  }
  const int64_t n = static_cast<int64_t>(n_seqs);
  Backend& b = *model_->backend();
  if (seq_mass_scratch_.empty() || seq_mass_scratch_.numel() < n) {
    const int64_t rows = std::max<int64_t>(n, options_.step.max_batch);
    ASSIGN_OR_RETURN(seq_mass_scratch_, b.Alloc(DType::kF32, {rows}, MemoryKind::kWorkspace));
  }
  Tensor device = View(seq_mass_scratch_, 0, {n});
  Tensor host(seq_mass_.data(), DType::kF32, {n});
  RETURN_IF_ERROR(b.CopyToDevice(host, &device));
  RETURN_IF_ERROR(tp.comm->AllReduceSum(&device));
  return b.ToHost(device, &host);
}

void SparseDecoder::SelectWithoutHead(std::span<const ForwardSeq> fwd,
                                      std::span<SeqState* const> states, SparseForward* sf) {
  lens_.resize(fwd.size());
  budgets_.resize(fwd.size());
  for (size_t i = 0; i < fwd.size(); ++i) {
    lens_[i] = fwd[i].past_len;
    budgets_[i] = states[i]->budget;
  }
  const int32_t n_kv = static_cast<int32_t>(model_->config().num_key_value_heads);
  const int32_t sets_per_seq = options_.mode == SelectionMode::kHeadLevel ? n_kv : 1;
  // window: these are the sets. oracle, quest: their sizes are every selection's, min(B, past), and
  // each layer replaces the positions with its own before it attends.
  WindowIndexSets(lens_, budgets_, n_kv, sets_per_seq, options_.sink, &selection_.sets);
  selection_.captured_mass.clear();
  selection_.n_q_heads = 0;
  selection_.pending = false;
  if (IsPerLayerSource(options_.source)) sf->layer_selection = &layer_spec_;
}

absl::Status SparseDecoder::StartRecallProbe(int64_t n_seqs, SparseForward* sf) {
  const ModelConfig& c = model_->config();
  const Shape shape{c.num_hidden_layers, n_seqs, c.num_attention_heads, 2};
  Backend& b = *model_->backend();
  if (recall_lse_.shape() != shape) {
    ASSIGN_OR_RETURN(recall_lse_, b.Alloc(DType::kF32, shape, MemoryKind::kWorkspace));
    recall_host_ = Tensor::HostEmpty(DType::kF32, shape);
  }
  RETURN_IF_ERROR(b.Zero(&recall_lse_));  // (0, 0) = recall 1 for the layers that attend densely
  sf->recall_lse = &recall_lse_;
  return absl::OkStatus();
}

absl::Status SparseDecoder::FinishRecallProbe(std::span<const ForwardSeq> fwd,
                                              std::span<SeqState* const> states,
                                              const SparseForward& sf) {
  const ModelConfig& c = model_->config();
  AttentionRecallStep& r = recall_step_;
  const int32_t n_seqs = static_cast<int32_t>(fwd.size());
  if (sf.recall_lse != nullptr) {
    RETURN_IF_ERROR(model_->backend()->ToHost(recall_lse_, &recall_host_));
    RETURN_IF_ERROR(RecallFromLse(recall_host_, &r));
  } else {
    FillFullRecall(n_seqs, static_cast<int32_t>(c.num_hidden_layers),
                   static_cast<int32_t>(c.num_attention_heads), &r);
  }
  r.step = decode_steps_;
  r.dense = sf.dense_attention;
  // The weak sequences' resident layers read every past position: recall 1 there, whatever the backend's
  // probe measured over the head's sets (the offloaded layers read those sets and keep their recall).
  r.fallback.assign(n_seqs, 0);
  const int32_t resident = tiers_->gpu_layers();
  for (int32_t i = 0; i < n_seqs && !sf.desc.dense_resident.empty(); ++i) {
    if (sf.desc.dense_resident[i] == 0) continue;
    r.fallback[i] = 1;
    for (int32_t l = 0; l < resident && l < r.n_layers; ++l) {
      std::fill_n(r.recall.begin() + (static_cast<size_t>(i) * r.n_layers + l) * r.n_heads, r.n_heads, 1.0f);
    }
  }
  r.ids.resize(n_seqs);
  r.positions.resize(n_seqs);
  for (int32_t i = 0; i < n_seqs; ++i) {
    r.ids[i] = states[i]->id;
    r.positions[i] = fwd[i].past_len;
  }
  r.head_mass.clear();
  const size_t nqh = static_cast<size_t>(selection_.n_q_heads);
  if (!sf.dense_attention && nqh > 0 && selection_.captured_mass.size() == nqh * fwd.size()) {
    for (int32_t i = 0; i < n_seqs; ++i) {
      double mass = 0;
      for (size_t h = 0; h < nqh; ++h) mass += selection_.captured_mass[i * nqh + h];
      r.head_mass.push_back(static_cast<float>(mass / static_cast<double>(nqh)));
    }
  }
  options_.recall_observer(r);
  return absl::OkStatus();
}

}  // namespace specontext
