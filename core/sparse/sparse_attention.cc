#include "core/sparse/sparse_attention.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status CheckF32(const Tensor& t, const char* what, int64_t d0, int64_t d1, int64_t d2) {
  if (t.empty() || t.dtype() != DType::kF32 || t.ndim() != 3 || t.dim(0) != d0 || t.dim(1) != d1 ||
      t.dim(2) != d2) {
    return absl::InvalidArgumentError(absl::StrCat("sparse attention: ", what, " must be f32 [", d0, ", ", d1,
                                                   ", ", d2, "], got ", t.DebugString()));
  }
  return absl::OkStatus();
}

// Row `row` of head `g` of a [n_kv, rows, hd] tensor as f32 (converted into `tmp` when not f32).
const float* RowF32(const Tensor& t, int64_t g, int64_t row, int64_t hd, float* tmp) {
  const int64_t off = (g * t.dim(1) + row) * hd;
  if (t.dtype() == DType::kF32) return t.as<float>() + off;
  ConvertToF32(static_cast<const uint8_t*>(t.data()) + off * DTypeSize(t.dtype()), t.dtype(), tmp, hd);
  return tmp;
}

float Dot(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t e = 0; e < n; ++e) s += a[e] * b[e];
  return s;
}

}  // namespace

void DenseAttentionOverRows(const float* q, const float* k_head, const float* v_head, int64_t hd,
                            std::span<const int32_t> rows, const float* k_cur, const float* v_cur,
                            float scale, float* out) {
  std::vector<double> s(rows.size() + 1);
  double mx = Dot(q, k_cur, hd) * scale;
  for (size_t j = 0; j < rows.size(); ++j) {
    s[j] = static_cast<double>(Dot(q, k_head + static_cast<int64_t>(rows[j]) * hd, hd)) * scale;
    mx = std::max(mx, s[j]);
  }
  s[rows.size()] = Dot(q, k_cur, hd) * scale;
  double sum = 0;
  std::vector<double> acc(hd, 0.0);
  for (size_t j = 0; j <= rows.size(); ++j) {
    const double p = std::exp(s[j] - mx);
    sum += p;
    const float* v = j < rows.size() ? v_head + static_cast<int64_t>(rows[j]) * hd : v_cur;
    for (int64_t e = 0; e < hd; ++e) acc[e] += p * v[e];
  }
  for (int64_t e = 0; e < hd; ++e) out[e] = static_cast<float>(acc[e] / sum);
}

absl::Status SparseAttentionCpu(const SparseAttentionArgs& a, Tensor* out) {
  if (a.sets == nullptr) return absl::InvalidArgumentError("sparse attention: no index sets");
  const IndexSets& sets = *a.sets;
  RETURN_IF_ERROR(ValidateIndexSets(sets));
  const int64_t n_seqs = sets.n_seqs, n_kv = sets.n_kv_heads;
  if (a.q.ndim() != 3 || a.q.dim(0) != n_seqs || a.q.dim(1) % n_kv != 0) {
    return absl::InvalidArgumentError(absl::StrCat("sparse attention: q ", a.q.DebugString(), " does not fit ",
                                                   n_seqs, " sequences with ", n_kv, " KV heads"));
  }
  const int64_t n_heads = a.q.dim(1), hd = a.q.dim(2), group = n_heads / n_kv;
  RETURN_IF_ERROR(CheckF32(a.q, "q", n_seqs, n_heads, hd));
  RETURN_IF_ERROR(CheckF32(a.k_cur, "k_cur", n_seqs, n_kv, hd));
  RETURN_IF_ERROR(CheckF32(a.v_cur, "v_cur", n_seqs, n_kv, hd));
  if (out == nullptr) return absl::InvalidArgumentError("sparse attention: no output");
  RETURN_IF_ERROR(CheckF32(*out, "out", n_seqs, n_heads, hd));
  if (static_cast<int64_t>(a.kv.size()) != n_seqs) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse attention: ", a.kv.size(), " KV views for ", n_seqs, " sequences"));
  }
  const bool slotted = !a.slots.empty();
  if (slotted && a.slots.size() != sets.indices.size()) {
    return absl::InvalidArgumentError(absl::StrCat("sparse attention: ", a.slots.size(), " slots for ",
                                                   sets.indices.size(), " indices"));
  }
  for (int64_t i = 0; i < n_seqs; ++i) {
    const SparseKvView& kv = a.kv[i];
    if (kv.k.ndim() != 3 || kv.k.dim(0) != n_kv || kv.k.dim(2) != hd || !IsFloating(kv.k.dtype()) ||
        kv.v.shape() != kv.k.shape() || kv.v.dtype() != kv.k.dtype()) {
      return absl::InvalidArgumentError(absl::StrCat("sparse attention: seq ", i, " K/V ", kv.k.DebugString(), " ",
                                                     kv.v.DebugString(), " do not fit [", n_kv, ", rows, ", hd, "]"));
    }
    const int64_t rows = kv.k.dim(1);
    for (int32_t s = i * sets.sets_per_seq; s < (i + 1) * sets.sets_per_seq; ++s) {
      for (int32_t j = sets.indptr[s]; j < sets.indptr[s + 1]; ++j) {
        const int32_t r = slotted ? a.slots[j] : sets.indices[j];
        if (r < 0 || r >= rows) {
          return absl::InvalidArgumentError(absl::StrCat("sparse attention: seq ", i, slotted ? " slot " : " position ",
                                                         r, " outside the ", rows, " rows of its K/V"));
        }
      }
    }
  }
  const float scale = a.scale != 0.0f ? a.scale : 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> scores, tmp(hd), acc(hd);
  for (int64_t i = 0; i < n_seqs; ++i) {
    const SparseKvView& kv = a.kv[i];
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t g = h / group;
      const int32_t set = sets.SetIndex(static_cast<int32_t>(i), static_cast<int32_t>(g));
      const int32_t b = sets.indptr[set], e = sets.indptr[set + 1];
      const float* q = a.q.as<float>() + (i * n_heads + h) * hd;
      const float* kc = a.k_cur.as<float>() + (i * n_kv + g) * hd;
      const float* vc = a.v_cur.as<float>() + (i * n_kv + g) * hd;
      // Scores of the set's rows in set order, then the current token last.
      scores.resize(e - b + 1);
      float mx = scores[e - b] = Dot(q, kc, hd) * scale;
      for (int32_t j = b; j < e; ++j) {
        const int32_t r = slotted ? a.slots[j] : sets.indices[j];
        scores[j - b] = Dot(q, RowF32(kv.k, g, r, hd, tmp.data()), hd) * scale;
        mx = std::max(mx, scores[j - b]);
      }
      float sum = 0;
      for (float& s : scores) {
        s = std::exp(s - mx);
        sum += s;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int32_t j = b; j <= e; ++j) {
        const float p = scores[j - b];
        const float* v = j < e ? RowF32(kv.v, g, slotted ? a.slots[j] : sets.indices[j], hd, tmp.data()) : vc;
        for (int64_t d = 0; d < hd; ++d) acc[d] += p * v[d];
      }
      float* o = out->as<float>() + (i * n_heads + h) * hd;
      const float inv = 1.0f / sum;
      for (int64_t d = 0; d < hd; ++d) o[d] = acc[d] * inv;
    }
  }
  return absl::OkStatus();
}

}  // namespace specontext
