// Sparse decode kernels (SpeContext): attention over index sets and the elastic host->GPU row gather.
//
// Both address K/V through per-sequence tables built by CudaBackend (cuda_sparse.cc) so that the same
// kernels serve GPU-resident layers (full cache, row = token position) and offloaded layers (slot buffer,
// row = slot). Index sets use the CSR layout of core/sparse/index_sets.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace specontext::cuda {

// Where one sequence's K/V of one layer live for sparse attention: bf16 [n_kv, rows, head_dim].
struct SparseKvPtrs {
  const void* k;
  const void* v;
  int64_t rows;  // capacity (resident layer) or slot budget (offloaded layer): the per-head row stride
};

// Keys per tile of the generic sparse attention kernel (one warp's worth: lane j owns key j in the
// softmax). The tensor-core kernel (head_dim 64/128, group <= 8) walks 16-key tiles per warp, 64 per CTA
// round; its chunks are multiples of 64.
constexpr int kSparseTile = 32;
constexpr int kSparseMaxGroup = 16;   // query heads per KV head
constexpr int kSparseMaxHeadDim = 256;

struct SparseAttnParams {
  const void* q = nullptr;      // bf16 [n_seqs, n_heads, head_dim]
  const void* k_cur = nullptr;  // bf16 [n_seqs, n_kv, head_dim]
  const void* v_cur = nullptr;
  void* out = nullptr;          // bf16 [n_seqs, n_heads, head_dim]
  const SparseKvPtrs* kv = nullptr;  // [n_seqs] for the layer
  const int32_t* indptr = nullptr;   // [n_seqs * sets_per_seq + 1]
  const int32_t* rows = nullptr;     // [indptr[n_sets]] row of each set entry (position or slot)
  // [n_seqs] or null (SparseDecodeDesc::dense_resident; resident layers only): a sequence with dense_len[seq]
  // >= 0 attends to rows [0, dense_len[seq]) of its full cache (every past position: the weak-retrieval
  // fallback) instead of its set. Uploaded with the sets' layout: read before the PDL wait.
  const int32_t* dense_len = nullptr;
  int sets_per_seq = 1;
  int n_seqs = 0;
  int n_heads = 0;
  int n_kv = 0;
  int head_dim = 0;
  float scale = 1.0f;
  // Split-K: each (seq, KV head) list of n_set + 1 keys (the set, then the current token) is cut into
  // chunks of `chunk` keys (a multiple of kSparseTile); grid.x = max_splits. With max_splits > 1 every
  // CTA writes a partial and the combine kernel merges them.
  int chunk = 0;
  int max_splits = 1;
  float* partial_o = nullptr;    // [n_seqs, n_kv, max_splits, group, head_dim] f32 (normalised)
  float* partial_lse = nullptr;  // [n_seqs, n_kv, max_splits, group] natural-log sum-exp
  // 0: the fastest kernel for the shape; 1: the generic kernel (benchmarks compare the two).
  int variant = 0;
  // Tensor-core kernel: before its PDL wait, ask L2 for the K/V rows of each warp's first tile (a hint; see
  // sparse_attention.cu). LaunchSparseAttention turns it off when SPC_SPARSE_PREFETCH=0 (A/B).
  bool l2_prefetch = true;
};

#if defined(__CUDACC__)
// The keys of the set of (sequence, KV head g): rows [b, b + n_set) of p.rows, then the current token
// (total = n_set + 1). Batch-level sets (one per sequence) serve every head. A dense sequence (p.dense_len)
// reads rows 0 .. n_set - 1 themselves (RowOf), its whole past.
struct SetKeys {
  int b, n_set, total;
  bool dense;
};
__device__ __forceinline__ SetKeys KeysOf(const SparseAttnParams& p, int seq, int g) {
  if (p.dense_len != nullptr) {
    const int n = p.dense_len[seq];
    if (n >= 0) return {0, n, n + 1, true};
  }
  const int set = seq * p.sets_per_seq + (p.sets_per_seq == 1 ? 0 : g);
  const int b = p.indptr[set];
  const int n_set = p.indptr[set + 1] - b;
  return {b, n_set, n_set + 1, false};
}
// The cache row of key `key` < keys.n_set (a set entry: position or slot; a dense sequence: the key itself).
__device__ __forceinline__ int RowOf(const SparseAttnParams& p, const SetKeys& keys, int key) {
  return keys.dense ? key : __ldg(p.rows + keys.b + key);
}
#endif

// Split-K plan for a batch: `sum_keys` = Σ over (sequence, KV head) lists of n_set + 1, `max_keys` the
// longest list. Call it after filling the shape fields and `variant` (the plan depends on the kernel).
// Sets p->chunk and p->max_splits (the partial buffers need
// n_seqs * n_kv * max_splits * group * (head_dim + 1) floats when max_splits > 1).
void PlanSparseAttention(int64_t sum_keys, int max_keys, int sm_count, SparseAttnParams* p);
// Batch-invariant mode: chunks of kBatchInvariantSparseChunk keys for every batch (a multiple of both kernels'
// units), and at least two splits so that every list, even of one chunk, is written through the combine pass:
// a list's splits and merge then follow from its own length alone.
constexpr int kBatchInvariantSparseChunk = 256;
void PlanSparseAttentionInvariant(int max_keys, SparseAttnParams* p);
// Bounds of the plans' split counts, which size the memory planner's bound of the partial buffers
// (CudaBackend::AttentionWorkspaceBytes).
// For every batch whose longest list has at most `max_keys` keys, whatever the other lists and the SMs: the
// batch-invariant plan's count (fixed chunks, at least two), or, for PlanSparseAttention, max_keys over the
// smallest chunk of either kernel (its cost model picks from the batch, but never a chunk below that).
int SparseAttentionSplitsCeiling(int64_t max_keys, bool batch_invariant);
// The most splits the plan gives a batch whose longest list has exactly `max_keys` keys and whose lists hold
// sum_keys in [min_lists, max_lists] x max_keys keys, for the kernel `shape` selects (n_heads, n_kv,
// head_dim, variant) on `sm_count` SMs: the batch-invariant plan's count, the generic plan's at the fewest
// keys (its chunk grows with them), the tensor-core plan's largest pick over the range (SparseMmaMaxSplits).
int SparseAttentionMaxSplits(int64_t max_keys, int64_t min_lists, int64_t max_lists, int sm_count,
                             bool batch_invariant, const SparseAttnParams& shape);
// The tensor-core plan's largest split count over sum_keys in [min_lists, max_lists] x max_keys with `resident`
// CTAs at once (SMs x blocks per SM). Its cost is not monotone in the keys (a wave more can favour smaller
// chunks): every candidate is checked at the end of each step of its cost.
int SparseMmaMaxSplits(int64_t max_keys, int64_t min_lists, int64_t max_lists, int64_t resident);

// Dynamic shared memory the generic attention kernel needs (the tensor-core kernel uses static memory).
size_t SparseAttnSmemBytes(int group, int head_dim);
// Attention kernel (+ the combine kernel when max_splits > 1) on `stream`; cudaErrorInvalidValue for an
// unsupported shape (group > 16, head_dim > 256 or not a multiple of 8, a bad plan).
cudaError_t LaunchSparseAttention(const SparseAttnParams& p, cudaStream_t stream);
// The combine pass alone (LaunchSparseAttention runs it when p.max_splits > 1): out from the partials.
cudaError_t LaunchSparseCombine(const SparseAttnParams& p, cudaStream_t stream);

// One row copy of the elastic loader: token row of the host copy -> slot of the slot buffer, for set `set`.
struct ElasticCopy {
  int32_t token;
  int32_t slot;
  int32_t set;
  int32_t pad;
};

// Per sequence of one offloaded layer: source (mapped pinned host, UVA pointers) and destination.
struct ElasticSeqPtrs {
  const void* host_k;
  const void* host_v;
  void* slot_k;
  void* slot_v;
  int64_t capacity;  // host rows per KV head
  int64_t slots;     // slot rows per KV head
  int64_t host_row_pitch;  // bytes from host row t of a head to row t + 1: row_bytes, or 2 * row_bytes when
                           // K and V are interleaved (SequenceKv "Host layout"; host_v = host_k + row_bytes)
};

struct ElasticGatherParams {
  const ElasticCopy* copies = nullptr;  // [n_copies]
  const ElasticSeqPtrs* seqs = nullptr; // [n_layers][n_seqs]: the layers gathered, in order
  int64_t n_copies = 0;
  int sets_per_seq = 1;
  int n_kv = 0;
  int n_seqs = 0;
  int n_layers = 1;       // layers sharing the copy list (a host layer group): one gather for all
  int64_t row_bytes = 0;  // head_dim * element size; a multiple of 16
};
// Copies, for every copy, every KV head its set covers and every layer, the K and the V row. Rows are read
// with 16-byte loads from mapped host memory, several in flight per thread; the pieces of one (copy, head)
// are consecutive items, layer by layer, K then V, so where a group's host rows of a token lie side by side
// (SequenceKv "Host layout") a warp reads them in one run.
cudaError_t LaunchElasticGather(const ElasticGatherParams& p, int sm_count, cudaStream_t stream);

}  // namespace specontext::cuda
