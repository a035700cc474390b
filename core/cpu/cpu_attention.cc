// KV append and causal GQA attention over per-sequence caches [n_kv_heads, capacity, head_dim].
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/parallel/parallel_for.h"
#include "core/status_macros.h"

namespace specontext {

absl::Status CpuBackend::KvAppend(int layer, const Tensor& k, const Tensor& v) {
  RETURN_IF_ERROR(CheckTensor(k, "kv_append k", DType::kF32, 3));
  RETURN_IF_ERROR(CheckSameShape(k, v, "kv_append k/v"));
  RETURN_IF_ERROR(CheckBatch(batch_, layer, k.dim(0)));
  const int64_t n_kv = k.dim(1), hd = k.dim(2);
  for (size_t i = 0; i < batch_.seqs.size(); ++i) {
    const SeqSlice& s = batch_.seqs[i];
    const Tensor& kc = batch_.kv[i]->k[layer];
    const Tensor& vc = batch_.kv[i]->v[layer];
    if (kc.ndim() != 3 || kc.dim(0) != n_kv || kc.dim(2) != hd || kc.dtype() != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat("kv_append: cache ", kc.DebugString(),
                                                     " does not fit k ", k.DebugString()));
    }
    const int64_t cap = kc.dim(1);
    for (int32_t t = 0; t < s.n_tokens; ++t) {
      const int64_t row = s.token_begin + t, pos = s.past_len + t;
      for (int64_t h = 0; h < n_kv; ++h) {
        std::memcpy(kc.as<float>() + (h * cap + pos) * hd, k.as<float>() + (row * n_kv + h) * hd,
                    hd * sizeof(float));
        std::memcpy(vc.as<float>() + (h * cap + pos) * hd, v.as<float>() + (row * n_kv + h) * hd,
                    hd * sizeof(float));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Attention(int layer, const Tensor& q, float scale, Tensor* out) {
  RETURN_IF_ERROR(CheckTensor(q, "attention q", DType::kF32, 3));
  RETURN_IF_ERROR(CheckSameShape(q, *out, "attention q/out"));
  RETURN_IF_ERROR(CheckBatch(batch_, layer, q.dim(0)));
  const int64_t n_heads = q.dim(1), hd = q.dim(2);
  // Flatten (sequence, token) pairs so one parallel loop covers the ragged batch.
  struct Work {
    int seq;
    int32_t row;
    int32_t pos;
  };
  std::vector<Work> work;
  work.reserve(q.dim(0));
  for (size_t i = 0; i < batch_.seqs.size(); ++i) {
    const SeqSlice& s = batch_.seqs[i];
    const Tensor& kc = batch_.kv[i]->k[layer];
    if (kc.ndim() != 3 || kc.dim(2) != hd || n_heads % kc.dim(0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("attention: cache ", kc.DebugString(),
                                                     " does not fit q ", q.DebugString()));
    }
    for (int32_t t = 0; t < s.n_tokens; ++t) work.push_back({static_cast<int>(i), s.token_begin + t, s.past_len + t});
  }
  const int64_t n_work = static_cast<int64_t>(work.size()) * n_heads;
  const int64_t avg_len = work.empty() ? 0 : (work.front().pos + work.back().pos) / 2 + 1;
  ParallelFor(n_work, 2 * avg_len * hd, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t wi = begin; wi < end; ++wi) {
      const Work& w = work[wi / n_heads];
      const int64_t h = wi % n_heads;
      const Tensor& kc = batch_.kv[w.seq]->k[layer];
      const Tensor& vc = batch_.kv[w.seq]->v[layer];
      const int64_t cap = kc.dim(1), group = n_heads / kc.dim(0), g = h / group;
      const float* qv = q.as<float>() + (static_cast<int64_t>(w.row) * n_heads + h) * hd;
      const float* kb = kc.as<float>() + g * cap * hd;
      const float* vb = vc.as<float>() + g * cap * hd;
      const int64_t len = w.pos + 1;
      scores.resize(len);
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        float dot = 0;
        for (int64_t e = 0; e < hd; ++e) dot += qv[e] * kb[j * hd + e];
        scores[j] = dot * scale;
        mx = std::max(mx, scores[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < len; ++j) {
        scores[j] = std::exp(scores[j] - mx);
        sum += scores[j];
      }
      const float inv = static_cast<float>(1.0 / sum);
      float* o = out->as<float>() + (static_cast<int64_t>(w.row) * n_heads + h) * hd;
      for (int64_t e = 0; e < hd; ++e) o[e] = 0;
      for (int64_t j = 0; j < len; ++j) {
        const float p = scores[j] * inv;
        for (int64_t e = 0; e < hd; ++e) o[e] += p * vb[j * hd + e];
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace specontext
