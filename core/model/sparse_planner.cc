// The measured-mode memory planner of the sparse decoders (core/model/sparse_decoder.h MakeMeasuredPlanner):
// the paper's layer thresholds (core/sparse/memory_planner.h) over the bytes the backend actually holds.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/model/sparse_decoder.h"
#include "core/sparse/index_sets.h"

namespace specontext {

absl::StatusOr<std::optional<MemoryPlanner>> MakeMeasuredPlanner(const Transformer& model, int32_t budget,
                                                                 int64_t gpu_memory_limit,
                                                                 int64_t retrieval_cache_per_token,
                                                                 int32_t max_context) {
  const ModelConfig& c = model.config();
  const int64_t context = ContextLimit(max_context, c.max_position_embeddings);
  Backend& b = *model.backend();
  const MemoryReport rep = b.memory_report();
  int64_t limit = gpu_memory_limit > 0 ? gpu_memory_limit : rep.limit;
  if (limit <= 0 && b.device() != DeviceKind::kCpu) {
    // No limit given: plan for the device's own memory (what is allocated plus what is still free), less a
    // margin for what the allocator does not see (cuBLAS workspaces, graph pools' growth, fragmentation).
    constexpr int64_t kMargin = int64_t{2} << 30;
    limit = std::max<int64_t>(0, rep.total + b.available_bytes() - kMargin);
  }
  if (limit <= 0) return std::nullopt;  // CPU without a limit: every layer stays resident
  MemoryPlannerConfig pc;
  pc.mode = MemoryModelMode::kMeasured;
  pc.n_layers = static_cast<int32_t>(c.num_hidden_layers);
  pc.n_kv_heads = static_cast<int32_t>(c.num_key_value_heads);
  pc.head_dim = static_cast<int32_t>(c.head_dim);
  pc.alpha = static_cast<int32_t>(c.num_attention_heads / c.num_key_value_heads);
  pc.kv_elem_bytes = static_cast<int32_t>(DTypeSize(b.compute_dtype()));
  pc.budget = budget;
  pc.max_context = context;
  pc.gpu_memory_bytes = limit;
  pc.measured.weights = rep.bytes[static_cast<size_t>(MemoryKind::kWeights)];
  pc.measured.graph_pools = rep.bytes[static_cast<size_t>(MemoryKind::kGraphs)];
  pc.measured.retrieval_weights = rep.bytes[static_cast<size_t>(MemoryKind::kRetrieval)];
  pc.measured.retrieval_cache_per_token = retrieval_cache_per_token;
  pc.measured.other = rep.total - pc.measured.weights - pc.measured.graph_pools - pc.measured.retrieval_weights;
  // Activations of one step are transient: bound them by a 512-token step (the engine's default chunk)
  // plus f32 logits of a 32-sequence batch.
  pc.measured.workspace =
      512 * (4 * c.hidden_size + 2 * c.intermediate_size + c.q_dim() + 2 * c.kv_dim()) * pc.kv_elem_bytes +
      32 * c.vocab_size * 4;
  if (b.device() != DeviceKind::kCpu) {
    // Prefill over an offloaded layer stages that layer's K/V rows of a sequence on the device (the CUDA
    // backend's prefill staging, at most 1 GiB): reserve one sequence's worth at the longest context admitted.
    const int64_t staging = 2 * c.kv_dim() * context * pc.kv_elem_bytes;
    pc.measured.workspace += std::min<int64_t>(staging, int64_t{1} << 30);
  }
  auto planner = MemoryPlanner::Create(pc);
  if (!planner.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("memory planner (device limit ", limit,
                                                   " bytes): ", planner.status().message()));
  }
  return std::optional<MemoryPlanner>(*std::move(planner));
}

}  // namespace specontext
