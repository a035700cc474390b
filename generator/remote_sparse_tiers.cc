// RemoteSparseDecoder's KV tiers: the measured-mode memory planner and layer moves (as SparseDecoder
// does them), and one decode forward with index sets from the retriever or, when they are missing, the
// fallback: exact dense attention on every resident layer, and on offloaded layers the sink + recent window
// their slot buffers hold.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/model/kv_tiers.h"
#include "core/model/sparse_decoder.h"
#include "core/status_macros.h"
#include "generator/remote_sparse_decoder.h"

namespace specontext::generator {
namespace {

// Per sequence and set: every past position when the past fits the budget, else the first `sink` positions
// and the most recent budget - sink ones, into *s (its buffers reused). The same layout SelectTopB produces
// (ascending CSR, sets_per_seq = n_kv_heads, or 1 for batch-level selection).
void WindowSets(std::span<const ForwardSeq> part, std::span<const int32_t> budgets, int32_t sink, int32_t n_kv,
                int32_t sets_per_seq, IndexSets* s) {
  s->n_seqs = static_cast<int32_t>(part.size());
  s->n_kv_heads = n_kv;
  s->sets_per_seq = sets_per_seq;
  s->budget = 0;
  s->seq_len.clear();
  s->indptr.assign(1, 0);
  s->indices.clear();
  for (size_t i = 0; i < part.size(); ++i) {
    const int32_t past = part[i].past_len, b = budgets[i];
    s->budget = std::max(s->budget, b);
    s->seq_len.push_back(past);
    const int32_t keep_first = past <= b ? past : std::min(sink, b);
    const int32_t recent_from = past <= b ? past : past - (b - keep_first);
    for (int32_t h = 0; h < sets_per_seq; ++h) {
      for (int32_t t = 0; t < keep_first; ++t) s->indices.push_back(t);
      for (int32_t t = std::max(recent_from, keep_first); t < past; ++t) s->indices.push_back(t);
      s->indptr.push_back(static_cast<int32_t>(s->indices.size()));
    }
  }
}

}  // namespace

absl::Status RemoteSparseDecoder::MakePlanner() {
  // The same planner and tier moves as in-process decoding, so both modes move layers at the same points.
  ASSIGN_OR_RETURN(std::optional<MemoryPlanner> planner,
                   MakeMeasuredPlanner(*model_, options_.budget, options_.gpu_memory_limit,
                                       /*retrieval_cache_per_token=*/0, options_.max_context,
                                       SparseStepWorkspaceBytes(*model_, /*head=*/nullptr, options_.step,
                                                                options_.max_context, options_.budget,
                                                                SelectionMode::kHeadLevel, false)));
  tiers_.emplace(model_->backend(), static_cast<int32_t>(model_->config().num_hidden_layers), std::move(planner),
                 options_.kv_grow_rows);
  return absl::OkStatus();
}

int64_t RemoteSparseDecoder::DeviceRowsInFlight() const {
  int64_t rows = 0;
  for (const auto& [id, seq] : seqs_) rows += seq.rows;
  return rows;
}

std::span<const TierSeq> RemoteSparseDecoder::TierSeqs() {
  tier_seqs_.clear();
  for (const auto& [id, seq] : seqs_) tier_seqs_.push_back({seq.kv, seq.budget, seq.rows, seq.capacity});
  return tier_seqs_;
}

absl::Status RemoteSparseDecoder::PlanLayers(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> steps) {
  // As SparseDecoder::PlanLayers: plan for the rows held after this step, then grow.
  int64_t total = DeviceRowsInFlight();
  std::vector<std::pair<Seq*, int32_t>> grow;
  for (size_t i = 0; i < fwd.size(); ++i) {
    auto it = seqs_.find(steps[i].id);
    if (it == seqs_.end() || it->second.kv != fwd[i].kv) continue;  // Forward reports it
    Seq& seq = it->second;
    const int32_t rows = DeviceRowsFor(fwd[i].past_len + static_cast<int32_t>(fwd[i].tokens.size()), seq.capacity,
                                       options_.kv_grow_rows);
    if (rows <= seq.rows) continue;
    total += rows - seq.rows;
    grow.push_back({&seq, rows});
  }
  RETURN_IF_ERROR(tiers_->Plan(total, static_cast<int32_t>(seqs_.size()), TierSeqs()));
  for (const auto& [seq, rows] : grow) {
    RETURN_IF_ERROR(GrowDeviceKv(*model_->backend(), seq->kv, rows));
    seq->rows = rows;
    ++stats_.kv_grows;
  }
  return absl::OkStatus();
}

absl::Status RemoteSparseDecoder::OffloadLayers(int32_t gpu_layers) { return tiers_->Offload(gpu_layers, TierSeqs()); }

absl::Status RemoteSparseDecoder::Decode(std::span<const ForwardSeq> part, std::span<Seq* const> seqs,
                                         std::span<const uint64_t> ids, Tensor* out, HiddenCapture* capture,
                                         bool device) {
  const int32_t n_layers = static_cast<int32_t>(model_->config().num_hidden_layers);
  const int32_t n_kv = static_cast<int32_t>(model_->config().num_key_value_heads);
  const int32_t n_sets = options_.batch_level ? 1 : n_kv;
  const bool offloaded = tiers_->any_offloaded();
  bool all_small = true;
  budgets_.clear();
  past_.clear();
  for (size_t j = 0; j < part.size(); ++j) {
    all_small = all_small && part[j].past_len <= seqs[j]->budget;
    budgets_.push_back(seqs[j]->budget);
    past_.push_back(part[j].past_len);
  }
  SparseForward sf;
  bool has_sets = false;
  if (all_small) {
    // Every past position is selected: the sets need no retriever (offloaded layers still need them, and so
    // does the batch-invariant mode: a short sequence keeps the sparse kernel it gets beside a long one).
    if (offloaded || model_->backend()->batch_invariant()) {
      WindowSets(part, budgets_, options_.sink, n_kv, n_sets, &sets_);
      has_sets = true;
      EndPhase(&step_secs_.selection);
    }
  } else {
    has_sets = SelectRemote(seqs, ids, past_, &sets_);
    if (has_sets) {
      ++remote_steps_;
    } else {
      ++fallback_steps_;
      // Resident layers attend densely; offloaded ones to what their slots can hold (sink + recent window).
      if (offloaded) {
        WindowSets(part, budgets_, options_.sink, n_kv, n_sets, &sets_);
        has_sets = true;
        sf.dense_resident_layers = true;
      }
      EndPhase(&step_secs_.selection);
    }
  }
  sf.dense_attention = !has_sets;
  bool planned = false;
  maps_.clear();
  if (has_sets) {
    sf.desc.sets = &sets_;
    if (offloaded) {
      // Every offloaded layer's copies from one plan, its buffers reused (as SparseDecoder's).
      cmaps_.clear();
      for (Seq* q : seqs) {
        maps_.push_back(q->map.get());
        cmaps_.push_back(q->map.get());
      }
      RETURN_IF_ERROR(PlanElasticLoads(cmaps_, sets_, &plan_));
      planned = true;
      sf.desc.slots = plan_.slots;
      if (tiers_->any_reload_pending()) FullReloadCopies(sets_, plan_.slots, &full_);
      layer_copies_.assign(n_layers, nullptr);
      for (int32_t l = tiers_->gpu_layers(); l < n_layers; ++l) {
        layer_copies_[l] = tiers_->reload_pending(l) ? &full_ : &plan_.copies;
      }
      sf.layer_copies = std::move(layer_copies_);
      sf.counters = &stats_.elastic;
      stats_.elastic.AddPlan(plan_);
      EndPhase(&step_secs_.elastic_plan);
    }
  }
  RETURN_IF_ERROR(SparseForwardInto(*model_, part, device, sf, capture, out, &layer_copies_));
  EndPhase(&step_secs_.forward);
  if (planned) {
    RETURN_IF_ERROR(ApplyElasticPlan(plan_, sets_, maps_));
    tiers_->ClearReloads();
  }
  ++(sf.dense_attention ? stats_.dense_steps : stats_.sparse_steps);
  EndPhase(&step_secs_.apply);
  return absl::OkStatus();
}

}  // namespace specontext::generator
