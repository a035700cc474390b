// The retrieval head (DESIGN.md §1 part 1, §5): a pruned DLM that, for every new token, computes its K
// (appended to the head's own per-sequence K cache) and its query, which selection (selection.h) scores
// against that cache. This is the CPU reference forward (f32, OpenBLAS, host K cache), used by the retriever
// service and the tests; the engine runs the same forward on its backend (retrieval_head_device.h).
//
//   layer:  x = RMSNorm(embed(id))                                  q/k = x · W{q,k}ᵀ (+ bias)
//   eagle3: x = cat(input_layernorm(embed(id)), hidden_norm(fc(h') + b))  q/k = x · W{q,k}ᵀ (+ bias)
//           h = cat of the target's hidden states entering its three fusion layers, for the previous
//           position (EAGLE-3 pairs token t with the target's features of position t−1; position 0: zeros)
//           h' = h, or RMSNorm per third (EAGLE-3.1 fc_norm) or of the whole (norm_before_fc); b: fc bias
//   then optional per-head RMSNorm (qk_norm), then RoPE at the token's position (YaRN etc. from config).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/io/weight_source.h"
#include "core/sparse/retrieval_head_config.h"
#include "core/sparse/retrieval_head_prune.h"  // PruneToRetrievalHead (callers include this header)
#include "core/tensor.h"

namespace specontext {

/// One sequence's retrieval K cache: k() is [n_kv_heads, capacity, head_dim] f32 host, rows [0, len()) valid.
/// Capacity grows by doubling (a view from k() is invalidated by Append).
class RetrievalKvCache {
 public:
  RetrievalKvCache(int64_t n_kv_heads, int64_t head_dim, int64_t initial_capacity = 256);
  int32_t len() const { return len_; }
  const Tensor& k() const { return k_; }
  /// Appends one token's K, `k_row` [n_kv_heads, head_dim], at position len().
  void Append(const float* k_row);
  /// Drops positions >= len (e.g. a rejected continuation).
  void Truncate(int32_t len) { len_ = std::min(len_, std::max(0, len)); }
  int64_t bytes() const { return static_cast<int64_t>(k_.nbytes()); }

 private:
  int64_t n_kv_, hd_;
  int32_t len_ = 0;
  Tensor k_;
};

class RetrievalHead {
 public:
  /// Builds a head from its config and tensors, validating every shape and the fit with `target`.
  /// `target_weights` supplies model.embed_tokens.weight when the head shares the target's embedding.
  static absl::StatusOr<std::unique_ptr<RetrievalHead>> Create(const RetrievalHeadConfig& config,
                                                               const WeightSource& weights,
                                                               const ModelConfig& target,
                                                               const WeightSource* target_weights);
  /// Loads `dir`/config.json and `dir`/model.safetensors. Errors are prefixed with the path.
  static absl::StatusOr<std::unique_ptr<RetrievalHead>> Load(const std::string& dir, const ModelConfig& target,
                                                             const WeightSource* target_weights);

  const RetrievalHeadConfig& config() const { return config_; }
  int64_t n_heads() const { return config_.attn.num_attention_heads; }
  int64_t n_kv_heads() const { return config_.attn.num_key_value_heads; }
  int64_t head_dim() const { return config_.attn.head_dim; }
  /// Parameters held by the head (a shared target embedding not counted).
  int64_t parameter_count() const { return params_; }
  /// Width of one token's fused hidden input (eagle3: 3 · target hidden; layer: 0).
  int64_t fused_width() const;
  /// Stored dtype of the embedding table (own or the target's).
  DType embedding_dtype() const { return embed_.dtype(); }

  /// Q and K of n tokens. ids, positions: n entries; fused: [n, fused_width()] f32 (eagle3) or empty.
  /// q: [n, n_heads, head_dim], k: [n, n_kv_heads, head_dim] f32, caller-allocated.
  absl::Status Forward(const std::vector<int32_t>& ids, const std::vector<int32_t>& positions, const Tensor& fused,
                       Tensor* q, Tensor* k) const;

  /// Observes a sequence's next tokens at positions cache->len(), ...: appends their K to `cache` and
  /// writes their queries to `q` [n, n_heads, head_dim]. The last row of q is the current token's query,
  /// to be scored against rows [0, cache->len() − 1) (its past).
  absl::Status Observe(const std::vector<int32_t>& ids, const Tensor& fused, RetrievalKvCache* cache, Tensor* q) const;

 private:
  friend class DeviceRetrievalHead;  // uploads the weights below (retrieval_head_device.h)
  RetrievalHead() = default;
  RetrievalHeadConfig config_;
  DType matrix_dtype_ = DType::kF32;  // stored dtype of the projection matrices (weight_dtype on upload)
  Tensor embed_;  // [vocab, hidden] stored dtype (own or the target's), rows converted on use
  std::vector<float> input_norm_, hidden_norm_, fc_, wq_, wk_, bq_, bk_, q_norm_, k_norm_;
  std::vector<float> fc_bias_;  // [hidden] or empty
  std::vector<float> fc_norm_;  // [fused_width] RMSNorm weights of the fused features (config_.fused_norm)
  std::vector<float> inv_freq_;
  float attention_scaling_ = 1.0f;
  int64_t params_ = 0;
};

/// Writes a head directory (config.json + model.safetensors with `tensors` in order).
absl::Status SaveRetrievalHead(const std::string& dir, const RetrievalHeadConfig& config,
                               const std::vector<std::pair<std::string, Tensor>>& tensors);

}  // namespace specontext
