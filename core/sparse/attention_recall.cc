#include "core/sparse/attention_recall.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

double Dot(const float* a, const float* b, int64_t n) {
  double d = 0;
  for (int64_t e = 0; e < n; ++e) d += static_cast<double>(a[e]) * b[e];
  return d;
}

}  // namespace

void AttentionLseOverRows(const float* q, const float* k, int64_t len, int64_t stride, int64_t hd,
                          std::span<const int32_t> positions, float scale, float* all, float* sel) {
  if (len <= 0) {
    *all = 0.0f;
    *sel = 0.0f;
    return;
  }
  std::vector<double> s(len);
  double mx = -INFINITY;
  for (int64_t t = 0; t < len; ++t) {
    s[t] = scale * Dot(q, k + t * stride, hd);
    mx = std::max(mx, s[t]);
  }
  double sum_all = 0, sum_sel = 0;
  for (int64_t t = 0; t < len; ++t) sum_all += std::exp(s[t] - mx);
  for (int32_t p : positions) sum_sel += std::exp(s[p] - mx);
  *all = static_cast<float>(mx + std::log(sum_all));
  *sel = sum_sel > 0 ? static_cast<float>(mx + std::log(sum_sel)) : -INFINITY;
}

absl::Status AttentionRecallCpu(const AttentionRecallArgs& a, Tensor* out) {
  if (a.sets == nullptr) return absl::InvalidArgumentError("attention recall: no index sets");
  const IndexSets& sets = *a.sets;
  RETURN_IF_ERROR(ValidateIndexSets(sets));
  const Tensor& q = a.q;
  if (q.dtype() != DType::kF32 || q.device() != DeviceKind::kCpu || q.ndim() != 3 ||
      q.dim(0) != sets.n_seqs || q.dim(1) % sets.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention recall: q ", q.DebugString(),
                                                   " does not fit ", sets.n_seqs, " sequences of ",
                                                   sets.n_kv_heads, " KV heads"));
  }
  const int64_t n_seqs = q.dim(0), n_heads = q.dim(1), hd = q.dim(2),
                group = n_heads / sets.n_kv_heads;
  if (out == nullptr || out->dtype() != DType::kF32 || out->device() != DeviceKind::kCpu ||
      out->shape() != Shape{n_seqs, n_heads, 2}) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention recall: out must be f32 host [", n_seqs, ", ", n_heads, ", 2]"));
  }
  if (static_cast<int64_t>(a.k.size()) != n_seqs) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention recall: ", a.k.size(), " K tensors for ", n_seqs, " sequences"));
  }
  const float scale = a.scale != 0.0f ? a.scale : 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t i = 0; i < n_seqs; ++i) {
    const Tensor& k = a.k[i];
    const int32_t len = sets.seq_len[i];
    if (k.dtype() != DType::kF32 || k.device() != DeviceKind::kCpu || k.ndim() != 3 ||
        k.dim(0) != sets.n_kv_heads || k.dim(2) != hd || k.dim(1) < len) {
      return absl::InvalidArgumentError(absl::StrCat("attention recall: seq ", i, " K ",
                                                     k.DebugString(), " does not hold ", len,
                                                     " rows of ", sets.n_kv_heads, " x ", hd));
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      const int32_t g = static_cast<int32_t>(h / group);
      float* o = out->as<float>() + (i * n_heads + h) * 2;
      AttentionLseOverRows(q.as<float>() + (i * n_heads + h) * hd,
                           k.as<float>() + g * k.dim(1) * hd, len, hd, hd,
                           sets.Positions(static_cast<int32_t>(i), g), scale, &o[0], &o[1]);
    }
  }
  return absl::OkStatus();
}

}  // namespace specontext
