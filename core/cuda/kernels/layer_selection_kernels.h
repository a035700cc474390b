// Kernels of the evaluation selection sources and the attention recall probe (the CUDA side of
// Backend::SelectLayerIndexSets and Backend::AttentionRecall; host code in
// core/cuda/cuda_layer_selection.cc). They read a layer's KV through the backend's batch metadata
// (AttnSeq + per-sequence K pointers of the layer, PrepareBatch) and the prepared index sets
// (indptr + positions in the sparse state's set buffer), so nothing is uploaded per layer. CPU
// references: SelectTopB (oracle, core/sparse/selection.h), QuestSelectTopB (core/sparse/quest.h),
// AttentionRecallCpu (core/sparse/attention_recall.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/kernels/attention.h"
#include "core/cuda/kernels/selection_kernels.h"

namespace specontext::cuda {

// The oracle runs the head selection's kernels (LaunchSelection) on a layer's own q and K. Their
// per-sequence table is built on the device from the batch metadata: sequence i gets q + i * n_q *
// head_dim, the layer's K (plain [n_kv, capacity, head_dim]), len = past_len, k_sel = the size of
// its first prepared set, keep = min(sink, k_sel), out_begin = indptr[i * sets_per_seq].
struct LayerSelSeqsParams {
  const void* q = nullptr;              // bf16 [n_seqs, n_q, head_dim]
  const AttnSeq* seqs = nullptr;        // [n_seqs] the layer's metadata
  const void* const* k_ptrs = nullptr;  // [n_seqs] the layer's K
  const int32_t* indptr = nullptr;      // prepared [n_seqs * sets_per_seq + 1]
  int n_seqs = 0, n_q = 0, head_dim = 0, sets_per_seq = 1, sink = 0;
  SelSeq* out = nullptr;  // [n_seqs]
};
cudaError_t LaunchBuildLayerSelSeqs(const LayerSelSeqsParams& p, cudaStream_t stream);

constexpr int kQuestMaxGroup = 16;  // query heads per KV head the page-score kernel takes

// Quest (core/sparse/quest.h, with the current token's key): page scores U of every (sequence,
// query head, page) over rows [0, past_len] of the layer's K (min and max of each page computed
// from the rows, in f32), then per set the top pages (forced sink pages first, then by the max of U
// over the set's heads, ties to the lower page) expanded into the set's past positions.
struct QuestParams {
  const void* q = nullptr;        // bf16 [n_seqs, n_q, head_dim]
  const AttnSeq* seqs = nullptr;  // [n_seqs] the layer's metadata (past_len, capacity, row_stride)
  const void* const* k_ptrs = nullptr;  // [n_seqs] the layer's K, bf16
  const int32_t* indptr = nullptr;  // prepared [n_seqs * sets_per_seq + 1]: set sizes min(B, past)
  int32_t* positions = nullptr;     // prepared positions, rewritten
  float* page_scores = nullptr;     // workspace [n_seqs, n_q, max_pages]
  int n_seqs = 0, n_q = 0, n_kv = 0, head_dim = 0;
  int sets_per_seq = 1,
      heads_per_set = 1;  // n_kv and the group (head level) or 1 and n_q (batch level)
  int page_size = 16, sink = 0;
  int max_pages = 0;  // ceil((longest past + 1) / page_size)
};
/// cudaErrorInvalidValue for a bad shape (group > kQuestMaxGroup, page_size < 1) or more pages than
/// shared memory holds (about 28K pages, 450K tokens, on an H100).
cudaError_t LaunchQuestSelection(const QuestParams& p, cudaStream_t stream);

// Recall probe: out[i, h] = (lse over past rows [0, past_len) of the layer's K, lse over the
// positions of the prepared set of (i, h / group)) of scale · q[i, h] · k. K rows at RowStride
// (resident plain or an offloaded layer's host copy, interleaved or not).
struct RecallParams {
  const void* q = nullptr;  // bf16 [n_seqs, n_heads, head_dim]
  const AttnSeq* seqs = nullptr;
  const void* const* k_ptrs = nullptr;
  const int32_t* indptr = nullptr;
  const int32_t* positions = nullptr;
  float* out = nullptr;  // f32 [n_seqs, n_heads, 2]
  int n_seqs = 0, n_heads = 0, n_kv = 0, head_dim = 0, sets_per_seq = 1;
  float scale = 1.0f;
};
cudaError_t LaunchAttentionRecall(const RecallParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
