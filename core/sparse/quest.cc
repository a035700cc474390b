#include "core/sparse/quest.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {

void QuestPageScores(const float* q, const float* k, int64_t len, int64_t hd, int32_t page_size,
                     float* out) {
  const int64_t n_pages = (len + page_size - 1) / page_size;
  for (int64_t p = 0; p < n_pages; ++p) {
    const int64_t t0 = p * page_size, t1 = std::min<int64_t>(len, t0 + page_size);
    float u = 0.0f;
    for (int64_t e = 0; e < hd; ++e) {
      float mn = INFINITY, mx = -INFINITY;
      for (int64_t t = t0; t < t1; ++t) {
        mn = std::min(mn, k[t * hd + e]);
        mx = std::max(mx, k[t * hd + e]);
      }
      u += std::max(q[e] * mn, q[e] * mx);
    }
    out[p] = u;
  }
}

void QuestPagesToPositions(const float* page_scores, int32_t len, int32_t rows, int32_t page_size,
                           int32_t k, int32_t sink, std::vector<int32_t>* out) {
  k = std::max(0, std::min(k, len));
  if (k == 0) return;
  const int32_t keep = std::max(0, std::min(sink, k));
  const int32_t n_pages = (rows + page_size - 1) / page_size;
  const int32_t forced = (keep + page_size - 1) / page_size;  // pages holding [0, keep)
  std::vector<int32_t> order(n_pages);
  std::iota(order.begin(), order.end(), 0);
  auto score = [page_scores](int32_t p) {
    return std::isnan(page_scores[p]) ? -INFINITY : page_scores[p];
  };
  std::stable_sort(order.begin() + forced, order.end(),
                   [&](int32_t a, int32_t b) { return score(a) > score(b); });
  const size_t base = out->size();
  int32_t taken = 0;
  for (int32_t p : order) {
    if (taken == k) break;
    const int32_t t0 = p * page_size, size = std::max(0, std::min(page_size, len - t0));
    const int32_t take = std::min(size, k - taken);
    for (int32_t t = t0; t < t0 + take; ++t) out->push_back(t);
    taken += take;
  }
  std::sort(out->begin() + base, out->end());
}

absl::Status QuestSelectTopB(std::span<const SelectionQuery> batch, const SelectionOptions& options,
                             int32_t page_size, bool with_current, IndexSets* out) {
  RETURN_IF_ERROR(ValidateBudget(options.budget, options.sink, 0));
  if (page_size < 1)
    return absl::InvalidArgumentError(absl::StrCat("quest: page size ", page_size, " < 1"));
  if (batch.empty()) return absl::InvalidArgumentError("quest: empty batch");
  const int64_t n_q = batch[0].q.dim(0), n_kv = batch[0].k_cache.dim(0), hd = batch[0].q.dim(1);
  if (n_kv <= 0 || n_q % n_kv != 0 || hd <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("quest: n_q_heads=", n_q, " must be a multiple of n_kv_heads=", n_kv));
  }
  int32_t max_budget = options.budget;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SelectionQuery& s = batch[i];
    if (s.q.dtype() != DType::kF32 || s.q.device() != DeviceKind::kCpu || s.q.ndim() != 2 ||
        s.q.dim(0) != n_q || s.q.dim(1) != hd || s.k_cache.dtype() != DType::kF32 ||
        s.k_cache.device() != DeviceKind::kCpu || s.k_cache.ndim() != 3 ||
        s.k_cache.dim(0) != n_kv || s.k_cache.dim(2) != hd || s.len < 0 ||
        s.len + (with_current ? 1 : 0) > s.k_cache.dim(1)) {
      return absl::InvalidArgumentError(absl::StrCat("quest: seq ", i, " q ", s.q.DebugString(),
                                                     " k ", s.k_cache.DebugString(), " len ", s.len,
                                                     " do not fit the batch (host f32)"));
    }
    if (s.budget != 0) {
      RETURN_IF_ERROR(ValidateBudget(s.budget, options.sink, 0));
      max_budget = std::max(max_budget, s.budget);
    }
  }
  const bool batch_level = options.mode == SelectionMode::kBatchLevel;
  const int64_t sets_per_seq = batch_level ? 1 : n_kv, group = n_q / n_kv;
  const int64_t heads_per_set = batch_level ? n_q : group;
  out->Reset(static_cast<int32_t>(batch.size()), static_cast<int32_t>(n_kv),
             static_cast<int32_t>(sets_per_seq), max_budget);
  std::vector<float> u, combined;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SelectionQuery& s = batch[i];
    const int32_t rows = s.len + (with_current && s.len > 0 ? 1 : 0);
    const int64_t cap = s.k_cache.dim(1), n_pages = (rows + page_size - 1) / page_size;
    out->seq_len[i] = s.len;
    u.resize(n_pages);
    for (int64_t set = 0; set < sets_per_seq; ++set) {
      combined.assign(n_pages, -INFINITY);
      for (int64_t j = 0; j < heads_per_set; ++j) {
        const int64_t h = set * heads_per_set + j, g = h / group;
        QuestPageScores(s.q.as<float>() + h * hd, s.k_cache.as<float>() + g * cap * hd, rows, hd,
                        page_size, u.data());
        for (int64_t p = 0; p < n_pages; ++p) {
          if (!std::isnan(u[p])) combined[p] = std::max(combined[p], u[p]);
        }
      }
      QuestPagesToPositions(combined.data(), s.len, rows, page_size,
                            s.budget != 0 ? s.budget : options.budget, options.sink, &out->indices);
      out->indptr.push_back(static_cast<int32_t>(out->indices.size()));
    }
  }
  return absl::OkStatus();
}

}  // namespace specontext
