#include "core/model/layer_tiers.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/model/kv_tiers.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

LayerTiers::LayerTiers(Backend* backend, int32_t n_layers, std::optional<MemoryPlanner> planner, int32_t grow_rows)
    : backend_(backend),
      n_layers_(n_layers),
      planner_(std::move(planner)),
      grow_rows_(grow_rows),
      gpu_layers_(n_layers),
      cap_(n_layers),
      reload_pending_(n_layers, false) {}

bool LayerTiers::any_reload_pending() const {
  return std::find(reload_pending_.begin(), reload_pending_.end(), true) != reload_pending_.end();
}

void LayerTiers::ClearReloads() { std::fill(reload_pending_.begin(), reload_pending_.end(), false); }

absl::StatusOr<int32_t> LayerTiers::Target(int64_t rows, int32_t n_seqs, std::span<const TierSeq> seqs) const {
  ASSIGN_OR_RETURN(LayerMovePlan plan, planner_->PlanMoves(gpu_layers_, rows, n_seqs, /*allow_return=*/true));
  if (plan.gpu_layers_after < gpu_layers_) return plan.gpu_layers_after;
  if (plan.gpu_layers_after > gpu_layers_ && gpu_layers_ < cap_) {
    int64_t margin = rows / 8;
    for (const TierSeq& s : seqs) margin += std::clamp<int64_t>(s.capacity - s.rows, 0, std::max(grow_rows_, 0));
    absl::StatusOr<int32_t> keep = planner_->GpuLayersFor(rows + margin, n_seqs);
    if (!keep.ok()) return gpu_layers_;  // no room to spare: stay as we are
    return std::max(gpu_layers_, std::min({*keep, plan.gpu_layers_after, cap_}));
  }
  return gpu_layers_;
}

absl::Status LayerTiers::Plan(int64_t rows, int32_t n_seqs, std::span<const TierSeq> seqs) {
  if (!planner_.has_value() || n_seqs == 0) return absl::OkStatus();
  absl::StatusOr<int32_t> target = Target(rows, n_seqs, seqs);
  if (agreement_) target = agreement_(target);
  RETURN_IF_ERROR(target.status());
  if (*target < gpu_layers_) return MoveToHost(*target, seqs);
  if (*target > gpu_layers_) return MoveToDevice(*target, seqs);
  return absl::OkStatus();
}

absl::Status LayerTiers::Offload(int32_t gpu_layers, std::span<const TierSeq> seqs) {
  if (gpu_layers < 0 || gpu_layers > n_layers_) {
    return absl::InvalidArgumentError(absl::StrCat("gpu layers ", gpu_layers, " outside [0, ", n_layers_, "]"));
  }
  cap_ = std::min(cap_, gpu_layers);
  return MoveToHost(gpu_layers, seqs);
}

absl::Status LayerTiers::MoveToHost(int32_t gpu_layers, std::span<const TierSeq> seqs) {
  // From the last layer backward, so the resident first layers hide the later layers' loads.
  for (int32_t l = gpu_layers_ - 1; l >= gpu_layers; --l) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const TierSeq& s : seqs) RETURN_IF_ERROR(MoveLayerToHost(*backend_, s.kv, l, s.budget));
    counters_.seconds += SecondsSince(t0);
    reload_pending_[l] = true;
    gpu_layers_ = l;
    ++counters_.moves;
    SPC_LOG(INFO) << "layer moved to host" << Kv("layer", l) << Kv("sequences", seqs.size());
  }
  return absl::OkStatus();
}

absl::Status LayerTiers::MoveToDevice(int32_t gpu_layers, std::span<const TierSeq> seqs) {
  // First offloaded layer first, so the resident layers stay a prefix; each sequence gets its resident rows.
  for (int32_t l = gpu_layers_; l < gpu_layers; ++l) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const TierSeq& s : seqs) RETURN_IF_ERROR(MoveLayerToDevice(*backend_, s.kv, l, s.rows));
    counters_.seconds += SecondsSince(t0);
    reload_pending_[l] = false;
    gpu_layers_ = l + 1;
    ++counters_.returns;
    SPC_LOG(INFO) << "layer moved back to the device" << Kv("layer", l) << Kv("sequences", seqs.size());
  }
  return absl::OkStatus();
}

}  // namespace specontext
