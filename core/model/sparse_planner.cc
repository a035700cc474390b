// The measured-mode memory planner of the sparse decoders (core/model/sparse_decoder.h MakeMeasuredPlanner):
// the paper's layer thresholds (core/sparse/memory_planner.h) over the bytes the backend actually holds.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/model/sparse_decoder.h"
#include "core/sparse/index_sets.h"

namespace specontext {

int64_t PrefillStagingReserveBytes(const Transformer& model, int32_t max_context) {
  const Backend& b = *model.backend();
  if (b.device() == DeviceKind::kCpu) return 0;  // the CPU reads host rows in place
  // Prefill over an offloaded layer stages that layer's K/V rows of a sequence on the device (the CUDA
  // backend's prefill staging, at most 1 GiB): one sequence's worth at the longest context admitted.
  const ModelConfig& c = model.config();
  const int64_t context = ContextLimit(max_context, c.max_position_embeddings);
  const int64_t staging = 2 * c.kv_dim() * context * static_cast<int64_t>(DTypeSize(b.compute_dtype()));
  return std::min<int64_t>(staging, int64_t{1} << 30);
}

int64_t SparseStepWorkspaceBytes(const Transformer& model, const DeviceRetrievalHead* head,
                                 const SparseStepShape& step, int32_t max_context, int32_t budget,
                                 SelectionMode mode, bool recall_probe, bool dense_fallback) {
  const ModelConfig& c = model.config();
  const Backend& b = *model.backend();
  const int64_t es = static_cast<int64_t>(DTypeSize(b.compute_dtype()));
  const int64_t seqs = std::max(1, step.max_batch);
  const int64_t n = std::max<int64_t>(step.max_tokens_per_step, seqs);  // a prompt chunk, or a decode batch
  auto t = [](int64_t bytes) { return AllocationBoundBytes(bytes); };
  const int64_t logits = t(seqs * c.vocab_size * 4);
  // SparseDecoder::Forward: a pass's device logits stay while the other pass runs, then both go to the
  // merged buffer (device_logits_).
  int64_t kept = 2 * logits;
  // The attention's own buffers (split-K partials, batch metadata, the index sets), kept between steps at the
  // largest any step asked for: every step shape up to the largest, sparse decode with the fallback's whole
  // pasts when on, either batch-invariant mode (Backend::AttentionWorkspaceBytes).
  const int32_t context = static_cast<int32_t>(ContextLimit(max_context, c.max_position_embeddings));
  AttentionWorkspaceShape attention = model.AttentionShape(n, seqs);
  attention.budget = budget;
  attention.max_context = context;
  attention.sets_per_seq = mode == SelectionMode::kHeadLevel ? static_cast<int32_t>(c.num_key_value_heads) : 1;
  attention.select_q_heads = head != nullptr ? static_cast<int32_t>(head->n_heads()) : 0;
  attention.dense_fallback = dense_fallback;
  kept += b.AttentionWorkspaceBytes(attention);
  int64_t peak = model.ForwardWorkspaceBytes(n, seqs, /*attention_buffers=*/false);
  if (head != nullptr) {
    const int64_t fw = head->fused_width(), hq = head->n_heads(), hkv = head->n_kv_heads(), hd = head->head_dim();
    // The hidden capture of a prompt chunk (kept by the decoder for the next chunk).
    if (fw > 0) kept += t(n * fw * es);
    // ObserveDecode's buffers of every batch size 1..max_batch (kRetrieval, kept: [3, n] i32 and q/k).
    for (int64_t k = 1; k <= seqs; ++k) kept += t(3 * k * 4) + t(k * (hq + hkv) * hd * es);
    // Prefill: Observe after the forward, beside its logits: q, the eagle3 gather and fused rows, the head.
    int64_t observe = logits + t(n * hq * hd * es) + head->ObserveWorkspaceBytes(n);
    if (fw > 0) observe += t((seqs + n) * 4) + t(n * fw * es) + t(seqs * fw * es);
    peak = std::max(peak, observe);
    // Decode: the selection's scratch over every position admitted, then the forward.
    const int64_t select = b.SelectionWorkspaceBytes(static_cast<int32_t>(seqs), static_cast<int32_t>(hq),
                                                     attention.sets_per_seq, context, budget);
    peak = std::max(peak, select + model.ForwardWorkspaceBytes(seqs, seqs, /*attention_buffers=*/false));
  }
  // The recall probe's lse [n_layers, n_seqs, n_heads, 2] f32 (kept).
  if (recall_probe) kept += t(c.num_hidden_layers * seqs * c.num_attention_heads * 2 * 4);
  return kept + peak;
}

absl::StatusOr<std::optional<MemoryPlanner>> MakeMeasuredPlanner(const Transformer& model, int32_t budget,
                                                                 int64_t gpu_memory_limit,
                                                                 int64_t retrieval_cache_per_token,
                                                                 int32_t max_context, int64_t step_workspace) {
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
  // Logged also without a limit, so a calibration start tells what a limit must leave for one step.
  SPC_LOG(INFO) << "memory planner step bound" << Kv("planner_workspace_bytes",
                                                     step_workspace + PrefillStagingReserveBytes(model, max_context))
                << Kv("device_limit", limit);
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
  // The transient bytes of one step (activations, logits, the head's and the selection's scratch), from the
  // shapes the step allocates (SparseStepWorkspaceBytes): counted as fixed, so the KV never takes them.
  pc.measured.workspace = step_workspace + PrefillStagingReserveBytes(model, max_context);
  auto planner = MemoryPlanner::Create(pc);
  if (!planner.ok()) {
    return absl::InvalidArgumentError(
                        absl::StrCat("memory planner (device limit ", limit, " bytes, of which a step's transient "
                                     "bytes take ", pc.measured.workspace, ": lower --max-tokens-per-step, "
                                     "--max-batch or --max-context, or raise the limit): ",
                                     planner.status().message()));
  }
  return std::optional<MemoryPlanner>(*std::move(planner));
}

}  // namespace specontext
