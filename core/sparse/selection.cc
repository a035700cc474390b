#include "core/sparse/selection.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status CheckQuery(const SelectionQuery& s, int i, int64_t* n_q, int64_t* n_kv, int64_t* hd) {
  const Tensor& q = s.q;
  const Tensor& k = s.k_cache;
  if (q.empty() || q.dtype() != DType::kF32 || q.ndim() != 2 || q.device() != DeviceKind::kCpu) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection: seq ", i, " q must be host f32 [n_q_heads, head_dim], got ", q.DebugString()));
  }
  if (k.empty() || k.dtype() != DType::kF32 || k.ndim() != 3 || k.device() != DeviceKind::kCpu) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection: seq ", i, " k_cache must be host f32 [n_kv_heads, capacity, head_dim], got ", k.DebugString()));
  }
  if (i == 0) {
    *n_q = q.dim(0);
    *n_kv = k.dim(0);
    *hd = q.dim(1);
    if (*n_kv <= 0 || *n_q % *n_kv != 0 || *hd <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("selection: n_q_heads=", *n_q,
                                                     " must be a positive multiple of n_kv_heads=", *n_kv));
    }
  }
  if (q.dim(0) != *n_q || q.dim(1) != *hd || k.dim(0) != *n_kv || k.dim(2) != *hd) {
    return absl::InvalidArgumentError(absl::StrCat("selection: seq ", i, " shapes q ", q.DebugString(), " k ",
                                                   k.DebugString(), " differ from the batch's"));
  }
  if (s.len < 0 || s.len > k.dim(1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection: seq ", i, " len ", s.len, " outside [0, capacity=", k.dim(1), "]"));
  }
  return absl::OkStatus();
}

// Softmax of q · K[0, len)ᵀ * scale into w[0, len). False when a score is not finite.
bool SoftmaxScores(const float* q, const float* k, int64_t len, int64_t hd, float scale, float* w) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < len; ++t) {
    const float* kr = k + t * hd;
    float dot = 0;
    for (int64_t e = 0; e < hd; ++e) dot += q[e] * kr[e];
    w[t] = dot * scale;
    if (!std::isfinite(w[t])) return false;
    mx = std::max(mx, w[t]);
  }
  double sum = 0;
  for (int64_t t = 0; t < len; ++t) {
    w[t] = std::exp(w[t] - mx);
    sum += w[t];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t t = 0; t < len; ++t) w[t] *= inv;
  return true;
}

}  // namespace

void TopKPositions(const float* scores, int32_t n, int32_t k, int32_t sink, std::vector<int32_t>* out) {
  k = std::max(0, std::min(k, n));
  const int32_t keep = std::max(0, std::min({sink, k, n}));
  const size_t base = out->size();
  for (int32_t p = 0; p < keep; ++p) out->push_back(p);
  const int32_t rest = k - keep;
  if (rest > 0) {
    std::vector<int32_t> cand(n - keep);
    std::iota(cand.begin(), cand.end(), keep);
    // Higher score first; equal scores: lower position first (a strict weak order, so deterministic).
    auto better = [scores](int32_t a, int32_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    };
    if (rest < static_cast<int32_t>(cand.size())) {
      std::nth_element(cand.begin(), cand.begin() + (rest - 1), cand.end(), better);
    }
    out->insert(out->end(), cand.begin(), cand.begin() + rest);
  }
  std::sort(out->begin() + base, out->end());
}

absl::Status SelectTopB(std::span<const SelectionQuery> batch, const SelectionOptions& options,
                        SelectionResult* out) {
  RETURN_IF_ERROR(ValidateBudget(options.budget, options.sink, 0));
  if (batch.empty()) return absl::InvalidArgumentError("selection: empty batch");
  int64_t n_q = 0, n_kv = 0, hd = 0;
  int32_t max_budget = options.budget;
  for (size_t i = 0; i < batch.size(); ++i) {
    RETURN_IF_ERROR(CheckQuery(batch[i], i, &n_q, &n_kv, &hd));
    if (batch[i].budget != 0) {
      RETURN_IF_ERROR(ValidateBudget(batch[i].budget, options.sink, 0));
      max_budget = std::max(max_budget, batch[i].budget);
    }
  }
  const float scale = options.scale != 0.0f ? options.scale : 1.0f / std::sqrt(static_cast<float>(hd));
  const bool batch_level = options.mode == SelectionMode::kBatchLevel;
  const int64_t sets_per_seq = batch_level ? 1 : n_kv;
  const int64_t group = n_q / n_kv;                       // query heads per KV head
  const int64_t heads_per_set = batch_level ? n_q : group;  // query heads combined into one set

  out->sets.Reset(static_cast<int32_t>(batch.size()), static_cast<int32_t>(n_kv),
                  static_cast<int32_t>(sets_per_seq), max_budget);
  out->n_q_heads = static_cast<int32_t>(n_q);
  out->captured_mass.assign(batch.size() * n_q, 0.0f);
  std::vector<float> w, combined;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SelectionQuery& s = batch[i];
    const int64_t len = s.len, cap = s.k_cache.dim(1);
    out->sets.seq_len[i] = s.len;
    w.resize(static_cast<size_t>(heads_per_set * len));
    combined.resize(len);
    for (int64_t set = 0; set < sets_per_seq; ++set) {
      // Softmax per query head of this set, then the element-wise max across them.
      std::fill(combined.begin(), combined.end(), 0.0f);
      for (int64_t j = 0; j < heads_per_set; ++j) {
        const int64_t h = set * heads_per_set + j;
        const int64_t kvh = h / group;
        float* wh = w.data() + j * len;
        if (!SoftmaxScores(s.q.as<float>() + h * hd, s.k_cache.as<float>() + kvh * cap * hd, len, hd, scale,
                           wh)) {
          return absl::InvalidArgumentError(
              absl::StrCat("selection: seq ", i, " query head ", h, " has a non-finite score"));
        }
        for (int64_t t = 0; t < len; ++t) combined[t] = std::max(combined[t], wh[t]);
      }
      const size_t begin = out->sets.indices.size();
      TopKPositions(combined.data(), static_cast<int32_t>(len), s.budget != 0 ? s.budget : options.budget, options.sink,
                    &out->sets.indices);
      out->sets.indptr.push_back(static_cast<int32_t>(out->sets.indices.size()));
      // Mass each query head keeps: sum of its weights over the chosen positions.
      for (int64_t j = 0; j < heads_per_set; ++j) {
        const float* wh = w.data() + j * len;
        double mass = 0;
        for (size_t p = begin; p < out->sets.indices.size(); ++p) mass += wh[out->sets.indices[p]];
        out->captured_mass[i * n_q + set * heads_per_set + j] = static_cast<float>(mass);
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SelectionResult> SelectTopB(std::span<const SelectionQuery> batch,
                                           const SelectionOptions& options) {
  SelectionResult r;
  RETURN_IF_ERROR(SelectTopB(batch, options, &r));
  return r;
}

}  // namespace specontext
