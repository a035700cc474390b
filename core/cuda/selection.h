// CUDA top-B selection: the fused score + top-k path of core/sparse/selection.h on the GPU.
//
// Same contract as SelectTopB (softmax weights per query head, element-wise max over each GQA group or over
// all heads in batch-level mode, top-B per set with ties to lower positions, the first `sink` positions
// always kept, captured mass per query head), for a batch of sequences of different lengths and budgets.
// The inputs live on the GPU: SelectionQuery::q [n_q_heads, head_dim] and k_cache [n_kv_heads, capacity,
// head_dim] are tensors of `backend` (a CUDA backend), f32 or bf16 (they may differ). The result is
// returned in host memory (the elastic planner runs on the host); the call waits for the GPU.
//
// Work memory (kWorkspace, released on return): n_seqs * n_q_heads * max_len * 4 bytes of logits plus
// n_sets * max_len * 4 of combined weights.
#pragma once

#include <span>

#include "absl/status/status.h"
#include "core/backend.h"
#include "core/sparse/selection.h"

namespace specontext {

/// Fills `out` like SelectTopB. InvalidArgument for bad shapes/options or a non-finite score (the
/// message names the batch, not the head), FailedPrecondition when `backend` is not CUDA.
absl::Status CudaSelectTopB(Backend& backend, std::span<const SelectionQuery> batch, const SelectionOptions& options,
                            SelectionResult* out);

}  // namespace specontext
