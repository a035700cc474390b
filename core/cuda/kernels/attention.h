// KV append and causal GQA attention over per-sequence caches, for a ragged batch.
//
// Caches: per sequence and layer, K and V are bf16 [n_kv, capacity, head_dim]; the kernels get
// them through device arrays of per-sequence pointers (one entry per sequence for the layer).
// Query "rows" of a sequence are (token, head-in-group) pairs, r = t * group + h, so one CTA
// serves every query head of a KV head and K/V are read once per group, not once per head.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace specontext::cuda {

// Per-sequence metadata, uploaded once per forward by PrepareBatch.
struct AttnSeq {
  int32_t token_begin;  // first activation row
  int32_t n_tokens;     // new tokens this step
  int32_t past_len;     // cached tokens before this step; new token t sits at past_len + t
  int32_t capacity;     // cache rows per KV head
  int32_t row_stride;   // elements from one cache row to the next: head_dim, or 2 * head_dim for an
                        // interleaved host K/V pair (SequenceKv "Host layout"); 0 reads as head_dim
};
// Elements from K/V row t of a head to row t + 1.
__host__ __device__ inline int RowStride(const AttnSeq& s, int head_dim) { return s.row_stride ? s.row_stride : head_dim; }

// One CTA's work (times n_kv via blockIdx.y): query rows [row_begin, row_begin + BLOCK_M) of
// sequence `seq` against keys [key_begin, key_end). out_slot < 0: write the normalised output;
// otherwise write a partial (O, log2-sum-exp) into partial slot out_slot for the combine kernel.
struct AttnWorkItem {
  int32_t seq;
  int32_t row_begin;
  int32_t key_begin;
  int32_t key_end;
  int32_t out_slot;
  int32_t pad[3];
};

// Merges the n_splits partials of one decode tile (rows [0, group) of token 0 of `seq`).
struct AttnCombineItem {
  int32_t seq;
  int32_t slot_begin;
  int32_t n_splits;
  int32_t pad;
};

struct AttnParams {
  const void* q = nullptr;  // bf16 [n_tokens, n_heads, head_dim]
  void* out = nullptr;      // bf16 [n_tokens, n_heads, head_dim]
  const AttnSeq* seqs = nullptr;
  const void* const* k_ptrs = nullptr;  // [n_seqs] bf16 [n_kv, capacity, head_dim]
  const void* const* v_ptrs = nullptr;
  const AttnWorkItem* items = nullptr;
  int n_items = 0;
  const AttnCombineItem* combine = nullptr;
  int n_combine = 0;
  int n_heads = 0;
  int n_kv = 0;
  int head_dim = 0;
  float scale = 1.0f;  // softmax scale (applied to q·k)
  float* partial_o = nullptr;    // [slots, n_kv, kDecodeBlockM, head_dim] f32
  float* partial_lse = nullptr;  // [slots, n_kv, kDecodeBlockM]
  // Simple kernel only: token row -> sequence index.
  const int32_t* row_seq = nullptr;
  int n_tokens = 0;
  // Decode-only batches (LaunchAttentionDecode): the grid is fixed by the batch size, not by the
  // lengths, so a CUDA graph of the step stays valid as sequences grow. Sequence s owns partial
  // slots [s * max_splits, (s + 1) * max_splits).
  int n_seqs = 0;
  int max_splits = 0;
};

// Tensor-core kernels exist for these head dims; others use the simple kernel.
inline bool MmaHeadDimSupported(int head_dim) { return head_dim == 64 || head_dim == 128; }

constexpr int kPrefillBlockM = 64;  // query rows per prefill CTA (4 warps x 16)
constexpr int kDecodeBlockM = 16;   // query rows per decode CTA (the group, padded)
constexpr int kDecodeKeysPerStage = 64;  // 4 warps x 16 keys; split sizes are multiples of it

constexpr int kMaxDecodeSplits = 64;
// Batch-invariant mode (CudaBackendOptions::batch_invariant): the max_splits of every batch, so that a
// sequence's split plan (DecodeSplitPlan) follows from its length alone: one split up to 128 keys, then
// splits of whole stages (one per 128 keys), 16 from 1,921 keys on.
constexpr int kBatchInvariantDecodeSplits = 16;

// Split-K plan of one decoding sequence of `len` keys (cached + the new one), computed the same way
// on the host and in the kernels: at most `max_splits` splits of at least two stages each, equal
// parts in whole stages. Gives the split count and the keys per split (the last may be shorter).
__host__ __device__ inline void DecodeSplitPlan(int len, int max_splits, int* splits, int* per) {
  constexpr int kMinKeys = 2 * kDecodeKeysPerStage;
  int n = (len + kMinKeys - 1) / kMinKeys;
  n = n < 1 ? 1 : (n > max_splits ? max_splits : n);
  const int keys = (len + n - 1) / n;
  *per = (keys + kDecodeKeysPerStage - 1) / kDecodeKeysPerStage * kDecodeKeysPerStage;
  *splits = (len + *per - 1) / *per;
}

// Splits per sequence for a decode-only batch: about two waves of CTAs (n_seqs x n_kv x splits)
// over the SMs, never more than kMaxDecodeSplits. Depends only on the batch's shape.
inline int DecodeMaxSplits(int n_seqs, int n_kv, int sm_count) {
  const int ctas = n_seqs * n_kv;
  int s = (2 * sm_count + ctas - 1) / (ctas > 0 ? ctas : 1);
  return s < 1 ? 1 : (s > kMaxDecodeSplits ? kMaxDecodeSplits : s);
}

enum class AttnKernel : uint8_t { kPrefill, kDecode };
// Decode-only batch (every sequence one new token, group <= kDecodeBlockM, MMA head dim): split-K
// attention with the plan derived on the device from each sequence's length (grid n_seqs x
// max_splits x n_kv; CTAs past a sequence's split count exit at once, and so do all CTAs of a sequence
// without exactly one new token: the batch-invariant mode runs the decoding rows of a mixed batch through
// this launch too, the prefill rows through LaunchAttentionMma), then the merge of the
// splits (grid n_seqs x n_kv x group; measured faster on the H100 at batch 1 than merging in the last
// split's CTA, which serialises the merge on one CTA). p.items is unused.
cudaError_t LaunchAttentionDecode(const AttnParams& p, cudaStream_t stream);
// The merge pass of LaunchAttentionDecode (sequences with one split return at once).
cudaError_t LaunchAttentionDecodeCombine(const AttnParams& p, cudaStream_t stream);
// Runs the tensor-core kernel over p.items (grid n_items x n_kv).
cudaError_t LaunchAttentionMma(const AttnParams& p, AttnKernel kind, cudaStream_t stream);
// Merges split partials into p.out (grid n_combine x n_kv).
cudaError_t LaunchAttentionCombine(const AttnParams& p, cudaStream_t stream);
// Any head_dim <= 256: one warp per (token, head), f32 throughout. Slow; for odd models.
cudaError_t LaunchAttentionSimple(const AttnParams& p, cudaStream_t stream);

// Copies new K/V rows into the caches: k, v bf16 [n_tokens, n_kv, head_dim].
struct KvAppendParams {
  const void* k = nullptr;
  const void* v = nullptr;
  const AttnSeq* seqs = nullptr;
  const int32_t* row_seq = nullptr;  // [n_tokens]
  void* const* k_ptrs = nullptr;     // [n_seqs] for the layer
  void* const* v_ptrs = nullptr;
  int n_tokens = 0;
  int n_kv = 0;
  int head_dim = 0;
};
cudaError_t LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream);

// RoPE of q and k in place, then the append of the rotated k and of v (Backend::RopeKvAppend), one launch:
// the rotation of LaunchRope (the same per-pair code, so the same bits) and the cache rows of
// LaunchKvAppend. kv.k must equal k; head_dim a multiple of 8 and k, v 16-byte aligned (the caller falls
// back to the two kernels otherwise).
struct RopeKvAppendParams {
  KvAppendParams kv;                   // caches and the batch metadata; kv.v the new V rows
  void* q = nullptr;                   // bf16 [n_tokens, n_heads, head_dim], rotated in place
  void* k = nullptr;                   // bf16 [n_tokens, n_kv, head_dim], rotated in place, then appended
  const int32_t* positions = nullptr;  // [n_tokens] rotation positions
  const float* inv_freq = nullptr;     // [head_dim / 2] f32
  int n_heads = 0;
  bool interleaved = false;            // pairs (2j, 2j + 1), else (j, j + head_dim / 2)
  float attention_scaling = 1.0f;
};
cudaError_t LaunchRopeKvAppend(const RopeKvAppendParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
