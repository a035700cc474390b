// Sparse decode attention over index sets: the CPU reference (DESIGN.md §3, §4 step 4).
//
// For every sequence and query head h (KV head g = h / (n_heads / n_kv_heads)), exact softmax attention of
// the current token's query over the past positions of the set that KV head g reads, plus the current
// token's own K/V:
//   out[h] = Σ_{p ∈ S(seq, g) ∪ {cur}} softmax_p(scale · q[h]·k_p) · v_p
// K/V of past positions come either from a full per-sequence cache (GPU-resident layer) or from the
// layer's slot buffer (offloaded layer), addressed through `slots`, an array parallel to
// IndexSets::indices that the elastic planner produces (ElasticPlan::slots). Both paths read the same
// index set in the same order, so with equal K/V rows they give bit-identical results.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "core/sparse/index_sets.h"
#include "core/tensor.h"

namespace specontext {

/// One sequence's past K/V for one layer (host memory; f32, bf16 or f16).
///   full cache:  k, v [n_kv_heads, capacity, head_dim], row = position
///   slot buffer: k, v [n_kv_heads, budget,   head_dim], row = slot
struct SparseKvView {
  Tensor k;
  Tensor v;
};

struct SparseAttentionArgs {
  const IndexSets* sets = nullptr;
  /// Empty: read the full caches at the set positions. Otherwise [sets->indices.size()] slot of each
  /// position, and the views are slot buffers.
  std::span<const int32_t> slots;
  std::span<const SparseKvView> kv;  // [n_seqs]
  Tensor q;       // [n_seqs, n_heads, head_dim] f32, the current token of each sequence
  Tensor k_cur;   // [n_seqs, n_kv_heads, head_dim] f32, the current token's K (RoPE applied)
  Tensor v_cur;   // [n_seqs, n_kv_heads, head_dim] f32
  float scale = 0.0f;  // 0 means 1/sqrt(head_dim)
};

/// out [n_seqs, n_heads, head_dim] f32 (caller-allocated). InvalidArgument on any shape, dtype or
/// index mismatch (positions past a cache's capacity, slots outside [0, budget)).
absl::Status SparseAttentionCpu(const SparseAttentionArgs& args, Tensor* out);

/// Dense reference: the same attention over an explicit list of past rows of a full cache
/// [n_kv, cap, hd] for one query head. Used by tests as the oracle; rows may be in any order.
void DenseAttentionOverRows(const float* q, const float* k_head, const float* v_head, int64_t hd,
                            std::span<const int32_t> rows, const float* k_cur, const float* v_cur,
                            float scale, float* out);

}  // namespace specontext
