#include "core/model/attention_recall_probe.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace specontext {

absl::Status RecallFromLse(const Tensor& lse, AttentionRecallStep* step) {
  if (lse.dtype() != DType::kF32 || lse.device() != DeviceKind::kCpu || lse.ndim() != 4 ||
      lse.dim(3) != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("recall probe: lse must be host f32 [n_layers, n_seqs, n_heads, 2], got ",
                     lse.DebugString()));
  }
  step->n_layers = static_cast<int32_t>(lse.dim(0));
  step->n_seqs = static_cast<int32_t>(lse.dim(1));
  step->n_heads = static_cast<int32_t>(lse.dim(2));
  step->recall.resize(static_cast<size_t>(step->n_seqs) * step->n_layers * step->n_heads);
  const float* p = lse.as<float>();
  for (int32_t l = 0; l < step->n_layers; ++l) {
    for (int32_t i = 0; i < step->n_seqs; ++i) {
      for (int32_t h = 0; h < step->n_heads; ++h) {
        const float* pair =
            p + ((static_cast<int64_t>(l) * step->n_seqs + i) * step->n_heads + h) * 2;
        const float r = std::exp(pair[1] - pair[0]);
        // NaN (a non-finite score) stays NaN: the summary shows it rather than hiding it.
        step->recall[(static_cast<size_t>(i) * step->n_layers + l) * step->n_heads + h] =
            std::isnan(r) ? r : std::min(1.0f, r);
      }
    }
  }
  return absl::OkStatus();
}

void FillFullRecall(int32_t n_seqs, int32_t n_layers, int32_t n_heads, AttentionRecallStep* step) {
  step->n_seqs = n_seqs;
  step->n_layers = n_layers;
  step->n_heads = n_heads;
  step->recall.assign(static_cast<size_t>(n_seqs) * n_layers * n_heads, 1.0f);
}

}  // namespace specontext
