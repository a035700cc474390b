// The retriever's per-stream state, usable in-process (the generator's `--retriever inproc`) or
// behind the Retriever.Session gRPC stream: sequences are opened, observe their new tokens (the head
// appends their K to the sequence's retrieval K cache) and are selected in batches (top-B index sets
// per sequence x KV head, core/sparse's CSR layout). Everything is freed when the session is destroyed.
//
// The head runs on the f32 host reference (RetrievalHead, RetrievalKvCache, SelectTopB) or, given a
// HeadRunner (`--backend cuda|auto`), on a Backend: each sequence's K cache and last query are then backend
// tensors and Select is one Backend::SelectIndexSets over the batch. Limits, error codes and messages are
// the same on both paths; bytes are accounted in the dtype the cache is kept in (f32 on the host and on the
// CPU backend, bf16 on CUDA).
//
// Threading: one session is used by one thread at a time; sessions share the (const) head and the runner
// (which serialises the backend work itself).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "core/sparse/retrieval_head.h"
#include "core/sparse/selection.h"
#include "retriever/head_runner.h"

namespace specontext::retriever {

struct SessionLimits {
  int32_t max_sequences = 256;               // open at once in one session
  int32_t max_tokens_per_sequence = 1 << 17; // retrieval K cache rows
  int32_t max_tokens_per_observe = 1 << 14;  // tokens in one Observe
  int32_t max_budget = 1 << 16;
  // Largest Selection reply (the server's --max-message-bytes): a Select whose index sets could exceed
  // it (sequences x sets x min(budget, past) x 4 bytes) is refused before any scoring. 0 = no bound.
  int64_t max_reply_bytes = 0;
  // Retrieval K cache and query bytes of all sessions of the process together (RetrieverTotals::
  // cache_bytes): an Open or Observe that would pass it is refused before allocating. 0 = no bound;
  // needs the totals.
  int64_t max_total_cache_bytes = 0;
};

/// Live totals over all sessions of one process (for metrics and tests); owned by the caller.
struct RetrieverTotals {
  std::atomic<int64_t> sessions{0};
  std::atomic<int64_t> sequences{0};
  std::atomic<int64_t> cache_bytes{0};
};

class RetrieverSession {
 public:
  /// `head`, `totals` (may be null) and `runner` (may be null: the host reference path) must outlive the
  /// session; `runner` must have been created from `head`.
  RetrieverSession(const RetrievalHead* head, SessionLimits limits, RetrieverTotals* totals,
                   HeadRunner* runner = nullptr);
  ~RetrieverSession();
  RetrieverSession(const RetrieverSession&) = delete;
  RetrieverSession& operator=(const RetrieverSession&) = delete;

  /// AlreadyExists for a live id; ResourceExhausted past max_sequences or max_total_cache_bytes;
  /// InvalidArgument for max_tokens.
  absl::Status Open(uint64_t sequence_id, int32_t max_tokens);
  /// Appends the K of `ids` (at the next positions) and keeps the last token's query for Select.
  /// ResourceExhausted, before any work, when the cache would grow past max_total_cache_bytes.
  /// `fused`: [n, head.fused_width()] f32 for EAGLE-3 heads, empty otherwise.
  absl::Status Observe(uint64_t sequence_id, const std::vector<int32_t>& ids, const std::vector<float>& fused);
  /// One sequence's new tokens in an ObserveBatch (the spans must stay valid for the call).
  struct ObserveEntry {
    uint64_t sequence_id = 0;
    std::span<const int32_t> ids;
    std::span<const float> fused;  // [ids.size(), head.fused_width()] or empty
  };
  /// Observes several sequences at once, with the same result as Observe of each entry in order (the same
  /// K caches and queries). All or nothing: every entry is checked first with the codes and messages of
  /// Observe, plus InvalidArgument for an id named twice and for more than max_tokens_per_observe tokens
  /// over the whole batch, and the cache bytes of all entries are reserved together; one refused entry
  /// leaves every sequence and the byte totals as they were. On the runner path the batch is one head
  /// forward. InvalidArgument for an empty batch. `failed` (may be null) receives the refused entry's id.
  absl::Status ObserveBatch(std::span<const ObserveEntry> batch, uint64_t* failed = nullptr);
  /// Index sets of the batch, in order: the last observed token's query scored against the past
  /// (every earlier position); `sink` first positions always kept. NotFound for an unknown id, FailedPrecondition before any Observe,
  /// InvalidArgument for an id named twice, ResourceExhausted when the reply could pass max_reply_bytes
  /// (all checked before any scoring).
  /// `mode` kBatchLevel: one set per sequence shared by every KV head (sets_per_seq 1).
  absl::StatusOr<SelectionResult> Select(const std::vector<uint64_t>& sequence_ids, int32_t budget,
                                         int32_t sink = 1, SelectionMode mode = SelectionMode::kHeadLevel);
  /// Frees the sequence (unknown ids: NotFound).
  absl::Status Close(uint64_t sequence_id);

  int32_t open_sequences() const { return static_cast<int32_t>(seqs_.size()); }
  const SessionLimits& limits() const { return limits_; }
  const RetrievalHead& head() const { return *head_; }

 private:
  struct Sequence {
    std::unique_ptr<RetrievalKvCache> cache;  // host path
    Tensor k;         // runner path: [n_kv_heads, rows, head_dim] backend tensor, rows [0, len) written
    int32_t len = 0;  // runner path: tokens observed
    Tensor last_q;    // [n_heads, head_dim] the latest token's query (host f32, or the runner's backend)
    int32_t max_tokens = 0;
    int64_t accounted_bytes = 0;
  };
  int32_t Len(const Sequence& s) const { return runner_ != nullptr ? s.len : s.cache->len(); }
  // Frees a sequence's storage (the runner's tensors under its mutex).
  void Free(Sequence& s);
  void Account(Sequence& s);
  // Observe's checks of one entry (size, capacity, token ids, feature width); no state changes.
  absl::Status CheckObserve(const ObserveEntry& e, const Sequence& s) const;
  // Raises the sequence's accounted bytes to `bytes` ahead of an allocation, refusing (ResourceExhausted)
  // when the process total would pass max_total_cache_bytes. `what` names the operation in the message.
  absl::Status Reserve(Sequence& s, int64_t bytes, const char* what, uint64_t id);
  // Bytes of a retrieval K cache of `rows` rows plus the query of one token.
  int64_t CacheBytes(int64_t rows) const;
  // Rows a sequence's cache has once it holds `len` tokens: the host cache starts at min(max_tokens, 256)
  // rows and doubles when full (RetrievalKvCache); the runner's doubles the same way, capped at max_tokens
  // (backend memory is the scarce kind).
  int64_t RowsFor(const Sequence& s, int64_t len) const;

  const RetrievalHead* head_;
  SessionLimits limits_;
  RetrieverTotals* totals_;
  HeadRunner* runner_;
  absl::flat_hash_map<uint64_t, Sequence> seqs_;
};

}  // namespace specontext::retriever
