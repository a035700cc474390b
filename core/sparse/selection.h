// Top-B token selection from the retrieval head's attention (DESIGN.md §1, §4 step 2).
//
// Per sequence, the head's query for the current token is scored against its K cache of the `len` past
// tokens; softmax weights are taken per query head; the weights of a GQA group's query heads are combined
// by element-wise max; the top-B positions per KV head are kept (ties: lower position first), the first
// `sink` positions always. When len <= B every past position is selected, so the sparse path is exact.
//
// This is the CPU reference (f32). The CUDA kernel (fused score + top-k) follows the same contract and is
// tested against it.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/sparse/index_sets.h"
#include "core/tensor.h"

namespace specontext {

enum class SelectionMode : uint8_t {
  kHeadLevel,   // one set per KV head: max over the head's GQA group
  kBatchLevel,  // one set per sequence shared by all KV heads: max over all query heads
};

struct SelectionOptions {
  int32_t budget = 2048;  // B: past positions per set
  int32_t sink = 1;       // first positions always kept (clamped to len)
  SelectionMode mode = SelectionMode::kHeadLevel;
  float scale = 0.0f;     // score scale; 0 means 1/sqrt(head_dim)
};

/// One sequence's inputs, host f32 views.
struct SelectionQuery {
  Tensor q;        // [n_q_heads, head_dim] the current token's query
  Tensor k_cache;  // [n_kv_heads, capacity, head_dim]; rows [0, len) are scored
  int32_t len = 0; // past tokens (the current token excluded), 0 <= len <= capacity
  int32_t budget = 0;  // per-request override of SelectionOptions::budget; 0 = use the options'
};

struct SelectionResult {
  IndexSets sets;
  /// [n_seqs, n_q_heads]: for each query head, the part of its softmax mass over the past tokens that lies
  /// in the set its KV head reads (1 when len <= B; 0 when len == 0).
  std::vector<float> captured_mass;
  int32_t n_q_heads = 0;
  /// Backend::StartSelectIndexSets left the positions and the mass on the device (FinishSelectIndexSets).
  bool pending = false;
};

/// Selects the index sets of a batch of sequences (lengths and budgets may differ; sets.budget is the
/// largest budget used). All sequences must share
/// n_q_heads, n_kv_heads and head_dim; n_q_heads must be a multiple of n_kv_heads. `out` is reused
/// across calls to avoid reallocation. InvalidArgument for bad shapes/options, non-finite scores.
absl::Status SelectTopB(std::span<const SelectionQuery> batch, const SelectionOptions& options,
                        SelectionResult* out);
absl::StatusOr<SelectionResult> SelectTopB(std::span<const SelectionQuery> batch,
                                           const SelectionOptions& options);

/// The positions of the `k` largest `scores[0, n)`, ties broken by lower position, returned ascending,
/// after always keeping positions [0, min(sink, k, n)). Appends to `out`. Exposed for tests and for
/// the CUDA kernel's reference.
void TopKPositions(const float* scores, int32_t n, int32_t k, int32_t sink, std::vector<int32_t>* out);

}  // namespace specontext
