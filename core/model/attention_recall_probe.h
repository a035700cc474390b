// The attention recall probe of sparse decoding (SparseOptions::recall_observer; docs/sparse.md
// "Attention recall"): after every decode step, for every sequence of the step, layer and query
// head, the part of the target's own softmax mass over the past tokens (the current token excluded)
// that lies in the set the head's KV head read in that layer: the head's or the window's sets
// (shared by all layers), or the layer's own (oracle, quest). Computed inside the decode forward
// from the layer's real q and KV (Backend::AttentionRecall), so it measures the code path that
// serves.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "core/tensor.h"

namespace specontext {

struct AttentionRecallStep {
  int64_t step = 0;  // decode steps of the decoder so far, this one included
  int32_t n_seqs = 0, n_layers = 0, n_heads = 0;
  std::vector<uint64_t> ids;       // [n_seqs] SparseStepSeq::id
  std::vector<int32_t> positions;  // [n_seqs] the decode token's position = its past tokens
  std::vector<float> recall;       // [n_seqs, n_layers, n_heads] in [0, 1]
  std::vector<float>
      head_mass;  // [n_seqs] head source: mean mass the head's own selection kept; else empty
  // Every past was within its budget: exact dense attention, recall 1 everywhere.
  bool dense = false;
  // [n_seqs] weak-retrieval fallback (SparseOptions::fallback_mass), per sequence: 1 where the sequence's
  // resident layers attended to every past position (recall 1 there; its offloaded layers read the head's
  // sets as every other sequence's do).
  std::vector<uint8_t> fallback;

  float at(int32_t seq, int32_t layer, int32_t head) const {
    return recall[(static_cast<size_t>(seq) * n_layers + layer) * n_heads + head];
  }
};

using AttentionRecallObserver = std::function<void(const AttentionRecallStep&)>;

/// Fills step->recall from the probe's host copy `lse` f32 [n_layers, n_seqs, n_heads, 2] (per
/// layer the (lse over all past, lse over the set) pairs of Backend::AttentionRecall): recall =
/// exp(sel - all), clamped to [0, 1] (rounding can put it a hair above 1 when the set holds every
/// past token). Sizes the arrays from the shape; ids/positions are the caller's.
absl::Status RecallFromLse(const Tensor& lse, AttentionRecallStep* step);

/// A step where every layer read every past token (dense, or B >= past): recall 1.
void FillFullRecall(int32_t n_seqs, int32_t n_layers, int32_t n_heads, AttentionRecallStep* step);

}  // namespace specontext
