// Index sets: the one addressing format shared by selection, elastic loading and sparse attention.
//
// A batch of sequences, each with one sorted set of past token positions per KV head, laid out CSR-style
// (FlashInfer's indptr/indices): the positions of set s = seq * sets_per_seq + head are
//   indices[indptr[s], indptr[s + 1])
// in strictly ascending order, each in [0, seq_len[seq]). The current token is never part of a set:
// attention adds it separately.
//
// Head-level selection has sets_per_seq == n_kv_heads; batch-level selection shares one set among all KV
// heads of a sequence (sets_per_seq == 1). SetIndex() hides the difference from consumers.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace specontext {

struct SparseDecodeDesc;  // core/backend.h
struct BatchDesc;         // core/backend.h

struct IndexSets {
  int32_t n_seqs = 0;
  int32_t n_kv_heads = 0;    // KV heads of the model the sets address
  int32_t sets_per_seq = 0;  // n_kv_heads (head-level) or 1 (batch-level, shared by all heads)
  int32_t budget = 0;        // B: the most positions a set may hold
  std::vector<int32_t> seq_len;  // [n_seqs] past tokens each sequence's sets were chosen from
  std::vector<int32_t> indptr;   // [n_seqs * sets_per_seq + 1], indptr[0] == 0, non-decreasing
  std::vector<int32_t> indices;  // [indptr.back()] token positions, ascending within each set

  int32_t n_sets() const { return n_seqs * sets_per_seq; }
  /// The set that KV head `kv_head` of sequence `seq` reads.
  int32_t SetIndex(int32_t seq, int32_t kv_head) const {
    return seq * sets_per_seq + (sets_per_seq == 1 ? 0 : kv_head);
  }
  /// Positions of the set of (seq, kv_head); a view valid until the IndexSets changes.
  std::span<const int32_t> Positions(int32_t seq, int32_t kv_head) const {
    const int32_t s = SetIndex(seq, kv_head);
    return std::span<const int32_t>(indices.data() + indptr[s], indptr[s + 1] - indptr[s]);
  }
  /// Positions of set `s` (0 <= s < n_sets()).
  std::span<const int32_t> SetPositions(int32_t s) const {
    return std::span<const int32_t>(indices.data() + indptr[s], indptr[s + 1] - indptr[s]);
  }

  /// Empties the sets and sets the layout; keeps vector capacity so a decode loop does not reallocate.
  void Reset(int32_t n_seqs, int32_t n_kv_heads, int32_t sets_per_seq, int32_t budget);
};

/// A plain view of index sets for kernels (CUDA and CPU alike): the same arrays, wherever they live (device
/// copies are made with one async copy per array; the layout never changes). Valid while the arrays are.
struct IndexSetsView {
  const int32_t* seq_len = nullptr;  // [n_seqs]
  const int32_t* indptr = nullptr;   // [n_seqs * sets_per_seq + 1]
  const int32_t* indices = nullptr;  // [indptr[n_sets]]
  int32_t n_seqs = 0;
  int32_t n_kv_heads = 0;
  int32_t sets_per_seq = 0;
  int32_t budget = 0;
};
inline IndexSetsView HostView(const IndexSets& s) {
  return {s.seq_len.data(), s.indptr.data(), s.indices.data(), s.n_seqs, s.n_kv_heads, s.sets_per_seq, s.budget};
}

/// Checks every invariant above (sizes, indptr monotone, positions strictly ascending and inside
/// [0, seq_len), at most `budget` per set). InvalidArgument naming the first violation.
absl::Status ValidateIndexSets(const IndexSets& sets);
/// ValidateIndexSets in two parts, for callers that walk the sets anyway (PlanElasticLoads checks each set
/// inside its parallel loop, while the positions are in cache): the layout (sizes, indptr, at most `budget`
/// per set; O(n_sets)), then the positions of set `set` (needs a valid layout).
absl::Status ValidateIndexSetsLayout(const IndexSets& sets);
absl::Status ValidateSetPositions(const IndexSets& sets, int32_t set);

/// |a ∩ b| of two strictly ascending position lists (a set's positions): the rows two steps' sets share,
/// which elastic loading does not move again.
int64_t SortedIntersectionSize(std::span<const int32_t> a, std::span<const int32_t> b);

/// Checks a backend's PrepareSparseDecode input against the batch it last prepared: valid sets, one group of
/// sets per sequence of the batch, each sequence decoding one token with past == the sets' seq_len, and slots
/// parallel to the indices (or empty). The CPU and CUDA backends share it.
absl::Status ValidateSparseDecode(const SparseDecodeDesc& desc, const BatchDesc& batch);

/// Checks a budget against a context length: budget >= 1, 0 <= sink <= budget, budget <= max_context
/// (when max_context > 0). InvalidArgument with a message naming the bad value.
absl::Status ValidateBudget(int64_t budget, int64_t sink, int64_t max_context);

/// The length (prompt + generated tokens) sequences may reach under a decoder's or engine's cap:
/// min(max_context, model_context) when max_context > 0, else model_context.
int64_t ContextLimit(int64_t max_context, int64_t model_context);
/// A cap on that length: 0 (the model's context) or in [max(budget, 1), model_context]. InvalidArgument
/// naming the values otherwise.
absl::Status ValidateMaxContext(int64_t max_context, int64_t budget, int64_t model_context);
/// OutOfRange when a sequence of `capacity` tokens exceeds `max_context` (> 0; 0 = no cap).
absl::Status CheckWithinMaxContext(int64_t capacity, int64_t max_context);

}  // namespace specontext
