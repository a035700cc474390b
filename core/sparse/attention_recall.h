// Attention recall: the part of the target's own softmax mass over the past tokens that an index
// set holds (docs/sparse.md "Attention recall"). For a query head h of KV head g, past tokens [0,
// len) of the layer (the current token excluded) and the set S the head reads,
//   recall = Σ_{t ∈ S} exp(s_t) / Σ_{t < len} exp(s_t) = exp(lse_sel - lse_all),  s_t = scale · q_h
//   · k_g,t.
// Backend::AttentionRecall returns the two log-sum-exps per (sequence, query head) from the layer's
// real q and KV inside the decode forward; this is its CPU reference (the CUDA kernel is tested
// against it).
#pragma once

#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "core/sparse/index_sets.h"
#include "core/tensor.h"

namespace specontext {

/// Natural-log sum-exp of scale · q · k_t over rows t < len of `k` (rows `stride` floats apart,
/// from row 0) in *all, and over the rows `positions` (each < len) in *sel. len == 0 gives 0 for
/// both (recall 1; a decode step always has a past); an empty set gives -inf. Accumulates in
/// double.
void AttentionLseOverRows(const float* q, const float* k, int64_t len, int64_t stride, int64_t hd,
                          std::span<const int32_t> positions, float scale, float* all, float* sel);

struct AttentionRecallArgs {
  const IndexSets* sets = nullptr;  // sets->seq_len[i] = past tokens of sequence i
  std::span<const Tensor> k;  // [n_seqs] the layer's K of each sequence, f32 host [n_kv, rows, hd]
  Tensor q;                   // [n_seqs, n_heads, hd] f32 host, the decode tokens' rotated queries
  float scale = 0.0f;         // 0 = 1/sqrt(hd)
};

/// out f32 host [n_seqs, n_heads, 2]: (lse over all past, lse over the set of (i, h / group)).
/// InvalidArgument for shapes or sets that do not fit.
absl::Status AttentionRecallCpu(const AttentionRecallArgs& args, Tensor* out);

}  // namespace specontext
