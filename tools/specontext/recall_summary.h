// Attention recall of a scored run (`specontext score --recall` / `--recall-out`), from the
// decoder's probe (core/model/attention_recall_probe.h): one compact JSON line per decode step, and
// the summary the score line carries (mean and 10th percentile per layer and overall, per position
// bucket).
#pragma once

#include <cstdint>
#include <vector>

#include "core/model/attention_recall_probe.h"
#include "nlohmann/json.hpp"

namespace specontext {

/// The JSON line of sequence `seq` of a probed step: {"position", "recall": per-layer mean over the
/// query heads, "min": per-layer min over them} (4 decimals), plus "head_mass" (head source: the
/// mass the head's own selection kept), "dense" (every past within the budget: recall 1) and
/// "fallback" (weak-retrieval fallback: resident layers dense) when they apply. `specontext score`
/// adds "nll", the loss of the token the step's logits predict.
nlohmann::ordered_json RecallStepLine(const AttentionRecallStep& step, int32_t seq);

class RecallSummary {
 public:
  /// `edges`: ascending position bucket edges; bucket b holds positions in [edges[b-1], edges[b]).
  explicit RecallSummary(std::vector<int64_t> edges)
      : edges_(std::move(edges)), buckets_(edges_.size() + 1) {}
  /// Adds sequence `seq` of a step. Dense steps (every past within the budget: recall 1 by
  /// construction) are counted apart and left out of the figures, which describe the steps that
  /// attended sparsely.
  void Add(const AttentionRecallStep& step, int32_t seq);
  /// {"steps", "dense_steps", "mean", "p10", "layers": [{"mean", "p10"}], "buckets": [{"from",
  /// "to", "steps", "mean", "p10", "layers": [...]}]}: over the (step, query head) recalls of each
  /// layer, and over all layers for the overall figures.
  nlohmann::json ToJson() const;

 private:
  struct Bucket {
    int64_t steps = 0;
    std::vector<std::vector<float>> layers;  // [n_layers][(step, head) samples]
  };
  std::vector<int64_t> edges_;
  std::vector<Bucket> buckets_;
  int64_t dense_steps_ = 0;
};

}  // namespace specontext
