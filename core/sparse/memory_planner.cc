#include "core/sparse/memory_planner.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/sparse/index_sets.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status NonNegative(int64_t v, const char* name) {
  if (v < 0) return absl::InvalidArgumentError(absl::StrCat("memory planner: ", name, " must be >= 0, got ", v));
  return absl::OkStatus();
}

absl::Status CheckSeqs(int32_t n_seqs) {
  if (n_seqs < 1) {
    return absl::InvalidArgumentError(absl::StrCat("memory planner: n_seqs must be >= 1, got ", n_seqs));
  }
  return absl::OkStatus();
}

}  // namespace

MemoryPlanner::MemoryPlanner(const MemoryPlannerConfig& c) : config_(c) {
  if (c.mode == MemoryModelMode::kPaper) {
    fixed_ = c.overhead_factor * (static_cast<double>(c.model_bytes) + static_cast<double>(c.dlm_bytes));
  } else {
    const MeasuredBytes& m = c.measured;
    fixed_ = static_cast<double>(m.weights) + m.workspace + m.graph_pools + m.retrieval_weights + m.other;
  }
}

absl::StatusOr<MemoryPlanner> MemoryPlanner::Create(const MemoryPlannerConfig& c) {
  if (c.n_layers < 1 || c.n_kv_heads < 1 || c.head_dim < 1 || c.alpha < 0 || c.kv_elem_bytes < 1) {
    return absl::InvalidArgumentError(absl::StrCat("memory planner: bad model shape L=", c.n_layers, " H=",
                                                   c.n_kv_heads, " D=", c.head_dim, " alpha=", c.alpha,
                                                   " kv_elem_bytes=", c.kv_elem_bytes));
  }
  if (c.max_context < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory planner: max_context must be >= 1 token, got ", c.max_context));
  }
  RETURN_IF_ERROR(ValidateBudget(c.budget, 0, c.max_context));
  if (c.gpu_memory_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory planner: GPU memory must be positive, got ", c.gpu_memory_bytes, " bytes"));
  }
  if (c.mode == MemoryModelMode::kPaper) {
    RETURN_IF_ERROR(NonNegative(c.model_bytes, "model_bytes (M_O)"));
    RETURN_IF_ERROR(NonNegative(c.dlm_bytes, "dlm_bytes (M_D)"));
    if (!(c.overhead_factor >= 1.0) || !std::isfinite(c.overhead_factor)) {
      return absl::InvalidArgumentError(
          absl::StrCat("memory planner: overhead factor must be >= 1, got ", c.overhead_factor));
    }
  } else {
    const MeasuredBytes& m = c.measured;
    RETURN_IF_ERROR(NonNegative(m.weights, "measured weights"));
    RETURN_IF_ERROR(NonNegative(m.workspace, "measured workspace"));
    RETURN_IF_ERROR(NonNegative(m.graph_pools, "measured graph_pools"));
    RETURN_IF_ERROR(NonNegative(m.retrieval_weights, "measured retrieval_weights"));
    RETURN_IF_ERROR(NonNegative(m.other, "measured other"));
    RETURN_IF_ERROR(NonNegative(m.retrieval_cache_per_token, "measured retrieval_cache_per_token"));
    RETURN_IF_ERROR(NonNegative(m.extra_per_token, "measured extra_per_token"));
    RETURN_IF_ERROR(NonNegative(m.extra_per_seq, "measured extra_per_seq"));
  }
  MemoryPlanner p(c);
  if (p.fixed_ >= static_cast<double>(c.gpu_memory_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat("memory planner: fixed GPU bytes ",
                                                     static_cast<int64_t>(p.fixed_), " (weights and overheads) ",
                                                     "do not fit the GPU memory of ", c.gpu_memory_bytes, " bytes"));
  }
  return p;
}

double MemoryPlanner::PerTokenBytes(int32_t i) const {
  const MemoryPlannerConfig& c = config_;
  const double hd = static_cast<double>(c.n_kv_heads) * c.head_dim;
  const double kv_token = 2.0 * hd * c.kv_elem_bytes;
  if (c.mode == MemoryModelMode::kPaper) return kv_token * (c.n_layers + 1 + c.alpha - i);
  return kv_token * (c.n_layers - i) + c.measured.retrieval_cache_per_token + c.measured.extra_per_token;
}

double MemoryPlanner::PerSeqBytes(int32_t i) const {
  const MemoryPlannerConfig& c = config_;
  const double kv_token = 2.0 * c.n_kv_heads * static_cast<double>(c.head_dim) * c.kv_elem_bytes;
  const double slots = kv_token * i * c.budget;
  return c.mode == MemoryModelMode::kPaper ? slots : slots + c.measured.extra_per_seq;
}

double MemoryPlanner::PredictBytes(int32_t i, int64_t total_tokens, int32_t n_seqs) const {
  return fixed_ + static_cast<double>(total_tokens) * PerTokenBytes(i) + n_seqs * PerSeqBytes(i);
}

absl::StatusOr<std::vector<int64_t>> MemoryPlanner::Thresholds(int32_t n_seqs) const {
  RETURN_IF_ERROR(CheckSeqs(n_seqs));
  std::vector<int64_t> st(config_.n_layers + 1);
  const double mem = static_cast<double>(config_.gpu_memory_bytes);
  for (int32_t i = 0; i <= config_.n_layers; ++i) {
    // Exact in double: every term is an integer (or 1.3 × an integer) far below 2^53.
    st[i] = static_cast<int64_t>(std::floor((mem - fixed_ - n_seqs * PerSeqBytes(i)) / PerTokenBytes(i)));
  }
  return st;
}

absl::StatusOr<std::vector<int64_t>> MemoryPlanner::ThresholdsPerSequence(int32_t n_seqs) const {
  ASSIGN_OR_RETURN(std::vector<int64_t> st, Thresholds(n_seqs));
  for (int64_t& v : st) v = static_cast<int64_t>(std::floor(static_cast<double>(v) / n_seqs));
  return st;
}

absl::StatusOr<int32_t> MemoryPlanner::GpuLayersFor(int64_t total_tokens, int32_t n_seqs) const {
  if (total_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("memory planner: total_tokens must be >= 0, got ", total_tokens));
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> st, Thresholds(n_seqs));
  for (int32_t i = 0; i <= config_.n_layers; ++i) {
    if (total_tokens <= st[i]) return config_.n_layers - i;
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "memory planner: ", total_tokens, " tokens over ", n_seqs, " sequences do not fit in ",
      config_.gpu_memory_bytes, " bytes even with every layer offloaded (limit ", st.back(), " tokens)"));
}

absl::StatusOr<LayerMovePlan> MemoryPlanner::PlanMoves(int32_t current, int64_t total_tokens, int32_t n_seqs,
                                                       bool allow_return) const {
  if (current < 0 || current > config_.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("memory planner: current GPU layers ", current,
                                                   " outside [0, ", config_.n_layers, "]"));
  }
  ASSIGN_OR_RETURN(int32_t target, GpuLayersFor(total_tokens, n_seqs));
  LayerMovePlan plan;
  plan.gpu_layers_before = current;
  if (target > current && !allow_return) target = current;
  plan.gpu_layers_after = target;
  for (int32_t l = current - 1; l >= target; --l) plan.moves.push_back({l, true});
  for (int32_t l = current; l < target; ++l) plan.moves.push_back({l, false});
  return plan;
}

}  // namespace specontext
