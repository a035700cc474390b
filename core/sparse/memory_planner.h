// Adaptive memory management (DESIGN.md §1 part 3, §4 step 5): how many layers keep their full KV on the GPU.
//
// With i of the L layers offloaded (always the last i: layers [L - i, L) live in host memory and read slot
// buffers of B rows), the GPU holds, for T tokens in flight over R sequences,
//   M(i, T, R) = fixed + T · per_token(i) + R · per_seq(i)
// Paper mode (SpeContext Eq. 6–8, 2-byte KV; "4" = K and V × 2 bytes):
//   fixed = 1.3 (M_O + M_D),  per_token(i) = 4 (L + 1 + α − i) H D,  per_seq(i) = 4 i B H D
// so with T = R·S the threshold ST_i = ⌊(Mem − 1.3(M_O+M_D) − 4·i·B·R·H·D) / (4·(L+1+α−i)·R·H·D)⌋ of the paper
// equals ⌊Thresholds(R)[i] / R⌋ (ThresholdsPerSequence).
// Measured mode replaces the 1.3 heuristic with bytes the engine measured:
//   fixed = weights + workspace + graph pools + retrieval weights + other,
//   per_token(i) = (L − i) · kv_token_bytes + retrieval_cache_per_token + extra_per_token,
//   per_seq(i) = i · B · kv_token_bytes + extra_per_seq,   kv_token_bytes = 2 · H · D · kv_elem_bytes.
// Thresholds are in total tokens in flight, so continuous batching with sequences of any length works.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext {

enum class MemoryModelMode : uint8_t { kPaper, kMeasured };

/// Bytes the engine measured on the device (MemoryReport kinds), for kMeasured.
struct MeasuredBytes {
  int64_t weights = 0;             // target model weights (kWeights)
  int64_t workspace = 0;           // activations and scratch (kWorkspace)
  int64_t graph_pools = 0;         // CUDA graph memory pools (kGraphs)
  int64_t retrieval_weights = 0;   // retrieval head weights (part of kRetrieval)
  int64_t other = 0;               // anything else fixed (allocator slack, cuBLAS workspace, ...)
  int64_t retrieval_cache_per_token = 0;  // retrieval head K cache bytes per token
  int64_t extra_per_token = 0;     // other bytes that grow with tokens in flight
  int64_t extra_per_seq = 0;       // other bytes per sequence (besides slot buffers)
};

struct MemoryPlannerConfig {
  MemoryModelMode mode = MemoryModelMode::kPaper;
  int32_t n_layers = 0;    // L
  int32_t n_kv_heads = 0;  // H
  int32_t head_dim = 0;    // D
  int32_t alpha = 0;       // α: query heads per KV head (paper mode)
  int32_t kv_elem_bytes = 2;
  int32_t budget = 2048;   // B
  int64_t max_context = 0; // tokens per sequence the engine allows; B must not exceed it
  int64_t gpu_memory_bytes = 0;  // Mem_GPU, or --gpu-memory-limit
  // kPaper
  int64_t model_bytes = 0;  // M_O
  int64_t dlm_bytes = 0;    // M_D
  double overhead_factor = 1.3;
  // kMeasured
  MeasuredBytes measured;
};

/// One layer's KV moving between tiers.
struct LayerMove {
  int32_t layer = 0;
  bool to_host = true;  // false: back to the GPU
};

struct LayerMovePlan {
  int32_t gpu_layers_before = 0;
  int32_t gpu_layers_after = 0;
  std::vector<LayerMove> moves;  // in execution order: to host last layer first; to GPU first layer first
};

class MemoryPlanner {
 public:
  /// Validates the configuration: positive dims, budget >= 1 and <= max_context, memory > 0, non-negative
  /// byte counts, and the fixed bytes below the GPU memory. InvalidArgument naming the field otherwise.
  static absl::StatusOr<MemoryPlanner> Create(const MemoryPlannerConfig& config);

  const MemoryPlannerConfig& config() const { return config_; }
  double fixed_bytes() const { return fixed_; }
  /// per_token(i) and per_seq(i) above, for i offloaded layers.
  double PerTokenBytes(int32_t offloaded) const;
  double PerSeqBytes(int32_t offloaded) const;
  /// M(i, T, R): predicted GPU bytes.
  double PredictBytes(int32_t offloaded, int64_t total_tokens, int32_t n_seqs) const;

  /// [L + 1] thresholds ST_0..ST_L in total tokens for `n_seqs` sequences: ST_i is the most tokens that
  /// fit with i layers offloaded (negative when not even the slot buffers fit).
  absl::StatusOr<std::vector<int64_t>> Thresholds(int32_t n_seqs) const;
  /// The paper's per-sequence thresholds: ⌊ST_i / n_seqs⌋.
  absl::StatusOr<std::vector<int64_t>> ThresholdsPerSequence(int32_t n_seqs) const;
  /// Layers whose KV stays on the GPU: L − i for the smallest i with total_tokens <= ST_i.
  /// ResourceExhausted when even i = L does not fit.
  absl::StatusOr<int32_t> GpuLayersFor(int64_t total_tokens, int32_t n_seqs) const;
  /// Moves from `current_gpu_layers` to GpuLayersFor(total_tokens, n_seqs). Layers only go back to the GPU
  /// when `allow_return` (e.g. after sequences finish); otherwise the plan never grows the GPU part.
  absl::StatusOr<LayerMovePlan> PlanMoves(int32_t current_gpu_layers, int64_t total_tokens, int32_t n_seqs,
                                          bool allow_return = false) const;

 private:
  explicit MemoryPlanner(const MemoryPlannerConfig& c);
  MemoryPlannerConfig config_;
  double fixed_ = 0;
};

}  // namespace specontext
