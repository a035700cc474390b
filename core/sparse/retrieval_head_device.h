// The retrieval head on a Backend (DESIGN.md §1 part 1, §5): the forward the engine runs every step, written
// once against core/backend.h so that the CPU and CUDA backends share it. Same math as the f32 reference
// RetrievalHead::Forward (retrieval_head.h), which the tests compare it with:
//
//   layer:  x = RmsNorm(Embedding(ids), input_norm)
//   eagle3: x = cat(RmsNorm(Embedding(ids), input_norm), RmsNorm(fused' · fcᵀ (+ b), hidden_norm))  (CopyToColumns)
//           fused' = fused, or RmsNorm with unit weights over its thirds / whole rows when the head has a fused
//           norm (EAGLE-3.1 fc_norm, norm_before_fc), whose weights are folded into fc's columns at upload
//   qk = x · [Wq; Wk]ᵀ (+ [bq; bk])                                    one GEMM for both projections
//   optional per-head RMSNorm (q_norm / k_norm), RoPE at each token's position (the head's own YaRN etc.)
//
// Observe appends each token's K to its sequence's cache, a backend tensor [n_kv_heads, capacity, head_dim]
// in the compute dtype (AllocateCache; MemoryKind::kRetrieval so that memory reports and the planner see
// it), for a whole ragged batch in one ScatterRows. Nothing here waits for the device.
// One thread at a time (the engine thread).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/sparse/retrieval_head.h"

namespace specontext {

class DeviceRetrievalHead {
 public:
  /// Uploads `head`'s weights to `backend` (kRetrieval): matrices in backend->weight_dtype(stored dtype),
  /// norms and biases in the compute dtype. `shared_embedding` (optional): a backend table
  /// [vocab, hidden] in weight_dtype already on the backend (the target's) used instead of uploading the
  /// head's; InvalidArgument when its shape does not fit. `head` and `backend` must outlive this object.
  static absl::StatusOr<std::unique_ptr<DeviceRetrievalHead>> Create(const RetrievalHead& head, Backend* backend,
                                                                     const Tensor* shared_embedding = nullptr);

  const RetrievalHead& host() const { return head_; }
  Backend* backend() const { return backend_; }
  int64_t n_heads() const { return head_.n_heads(); }
  int64_t n_kv_heads() const { return head_.n_kv_heads(); }
  int64_t head_dim() const { return head_.head_dim(); }
  /// Width of one token's fused input (eagle3: 3 · target hidden; layer: 0).
  int64_t fused_width() const { return head_.fused_width(); }
  /// Device bytes of the uploaded weights (a shared embedding not counted).
  int64_t weight_bytes() const { return weight_bytes_; }
  /// Bytes one cached token takes: n_kv_heads · head_dim · compute dtype size.
  int64_t cache_bytes_per_token() const;

  /// A sequence's K cache [n_kv_heads, capacity, head_dim], compute dtype, kRetrieval, uninitialised.
  absl::StatusOr<Tensor> AllocateCache(int32_t capacity) const;

  /// Q and K of n tokens. ids, positions: [n] i32 backend tensors; fused: [n, fused_width()] compute dtype
  /// (eagle3; null for layer heads); q [n, n_heads, head_dim], k [n, n_kv_heads, head_dim] compute dtype,
  /// caller-allocated backend tensors.
  absl::Status Forward(const Tensor& ids, const Tensor& positions, const Tensor* fused, Tensor* q, Tensor* k);

  /// One sequence's part of an Observe batch: its n_tokens new tokens (consecutive rows of the batch, in
  /// `seqs` order) are at positions [pos, pos + n_tokens); their K goes to (*cache)[:, pos + i, :].
  struct Seq {
    Tensor* cache = nullptr;  // [n_kv_heads, capacity, head_dim] from AllocateCache
    int32_t n_tokens = 0;
    int32_t pos = 0;
  };
  /// Observes a ragged batch: ids [n] host (n = Σ n_tokens), fused as in Forward (rows in batch order),
  /// q [n, n_heads, head_dim] backend tensor (compute dtype) receives every token's query. One upload of
  /// ids and positions, one forward, one ScatterRows. OutOfRange when a sequence's tokens pass its capacity.
  absl::Status Observe(std::span<const int32_t> ids, std::span<const Seq> seqs, const Tensor* fused, Tensor* q);
  /// The most backend bytes (kWorkspace, AllocationBoundBytes each) Observe of n tokens allocates at once
  /// (its ids/positions and k, and Forward's e, normed, x, part, qk), not counting the caller's q and fused.
  int64_t ObserveWorkspaceBytes(int64_t n) const;

 private:
  DeviceRetrievalHead(const RetrievalHead& head, Backend* backend) : head_(head), backend_(backend) {}

  const RetrievalHead& head_;
  Backend* backend_;
  Tensor embed_;                 // [vocab, hidden] (own upload or the shared table)
  Tensor input_norm_;            // [hidden]
  Tensor fc_, hidden_norm_;      // eagle3: [hidden, fused_width] (fused-norm weights folded in), [hidden]
  Tensor fc_bias_;               // eagle3: [hidden] or empty
  Tensor fused_norm_unit_;       // eagle3 with a fused norm: ones [fused_width / fused_groups_]
  int64_t fused_groups_ = 0;     // 0: no fused norm; 3: per fused layer (fc_norm); 1: whole (norm_before_fc)
  Tensor w_qk_, b_qk_;           // [(n_heads + n_kv) · hd, in], [(n_heads + n_kv) · hd] or empty
  Tensor q_norm_, k_norm_;       // [hd] or empty
  Tensor inv_freq_;              // [hd / 2] f32
  RopeArgs rope_;
  int64_t weight_bytes_ = 0;
  std::vector<int32_t> staging_;  // host ids ++ positions of the last Observe (reused)
  std::vector<RowScatter> segments_;
};

}  // namespace specontext
