// Fused score + top-B selection kernels (the CUDA side of core/sparse/selection.h; entry point in
// core/cuda/selection.h). Two launches per batch: scores (one pass over each K cache, the GQA group's
// query heads together, logits and per-chunk softmax partials out), then one CTA per set: softmax
// statistics, the set's combined weights in shared memory, radix select, ordered compaction, captured mass.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace specontext::cuda {

// One sequence of the batch.
struct SelSeq {
  const void* q;      // [n_q, head_dim]
  const void* k;      // [n_kv, capacity, head_dim]
  int64_t capacity;
  int32_t len;        // past tokens scored
  int32_t k_sel;      // positions per set: min(budget, len)
  int32_t keep;       // always-kept first positions: min(sink, k_sel)
  int32_t out_begin;  // offset of the sequence's first set in `indices`
};

struct SelectionParams {
  const SelSeq* seqs = nullptr;  // [n_seqs]
  int n_seqs = 0;
  int n_q = 0;
  int n_kv = 0;
  int head_dim = 0;
  int sets_per_seq = 1;    // n_kv (head level) or 1 (batch level)
  int heads_per_set = 1;   // query heads combined into one set
  int max_len = 0;
  float scale = 1.0f;
  bool q_bf16 = false;     // else f32
  bool k_bf16 = false;
  float* logits = nullptr;    // [n_seqs, n_q, max_len] scale * q·k
  float* stats = nullptr;     // SelectionStatsFloats(): [n_seqs, n_q, chunks of max_len] (max, Σexp) pairs
  float* combined = nullptr;  // [n_seqs * sets_per_seq, max_len] set max of the softmax weights; used only
                              // when max_len exceeds what shared memory holds (about 55K positions on H100)
  int32_t* indices = nullptr; // CSR positions (set s of seq i at out_begin + s * k_sel)
  float* mass = nullptr;      // [n_seqs, n_q]
  int* error_flag = nullptr;  // set to 1 when a score is not finite
};

// Floats the `stats` buffer needs (per-chunk softmax partials of every query head).
size_t SelectionStatsFloats(int n_seqs, int n_q, int max_len);
cudaError_t LaunchSelection(const SelectionParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
