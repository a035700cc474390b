// `prune`: a retrieval head directory (retrieval_head_config.h) from a DLM checkpoint (DESIGN.md
// §5).
//  kEagle3: an EAGLE-3 draft as SafeAILab, SpecForge/SGLang/ModelOpt or vLLM speculators ship it
//           (eagle3_draft.h): keeps fc (+ its bias and fused-feature norms), hidden_norm,
//           input_layernorm and the first layer's q/k projections (+ biases, q/k norms of
//           Qwen3-type layers) with the RoPE the publisher trained with; drops v/o/MLP, the LM
//           head, d2t/t2d and any embedding (the target's is shared).
//  kLayer:  an HF model sharing the tokenizer: keeps its embedding, layer 0's input norm and q/k
//           projections (biases, QK norms).
// Every kept tensor's shape is checked against the source config; a mismatch names the tensor and
// both shapes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/io/model_config.h"
#include "core/sparse/eagle3_draft.h"
#include "core/sparse/retrieval_head_config.h"

namespace specontext {

/// Choices that replace what the source says. Unset fields keep the publisher's values.
struct PruneOptions {
  std::optional<double> rope_theta;
  /// YaRN (the paper stretches drafts trained at 2K to the target's context with it). 0: no
  /// scaling; > 1: YaRN with this factor.
  std::optional<double> yarn_factor;
  /// YaRN with factor = target max_position_embeddings / original_max_position.
  bool yarn_auto = false;
  std::optional<int64_t> original_max_position;  // default: the draft's max_position_embeddings
  std::optional<double> yarn_beta_fast, yarn_beta_slow, yarn_attention_factor;
  /// Replaces the whole rope_scaling (tests; layer heads).
  std::optional<RopeScaling> rope_scaling;
  /// Fusion layers as target hidden_states indices (inputs of those layers), replacing the draft's.
  std::optional<std::vector<int64_t>> fusion_layers;
  /// The draft's publisher instead of the detected one.
  std::optional<DraftPublisher> publisher;
};

struct PruneReport {
  int64_t parameters_before =
      0;  // floating tensors of the source (buffers such as d2t/t2d not counted)
  int64_t parameters_after = 0;    // tensors written to the head
  std::string source;              // e.g. "EAGLE-3 draft, specforge layout (model.safetensors)"
  std::vector<std::string> notes;  // what was chosen and why: fusion layers, RoPE, parts not used
};

absl::StatusOr<PruneReport> PruneToRetrievalHead(const std::string& source_dir,
                                                 RetrievalHeadKind kind, const ModelConfig& target,
                                                 const std::string& target_name,
                                                 const std::string& out_dir,
                                                 const PruneOptions& options = {});

}  // namespace specontext
