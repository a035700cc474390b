// Retrieval head files (DESIGN.md §5): a directory with
//   config.json        an HF-style model config of the head's attention (architectures, hidden_size,
//                      num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope_theta,
//                      rope_scaling incl. YaRN, vocab_size, max_position_embeddings; num_hidden_layers = 1)
//                      plus a "specontext_retrieval_head" object:
//                        { "format_version": 1, "kind": "eagle3" | "layer", "embedding": "own" | "target",
//                          "fusion_layers": [l0, l1, l2]            (eagle3: target layers whose input hidden
//                                                                    state, HF hidden_states[l], feeds fc)
//                          "target": { "name", "vocab_size", "hidden_size", "num_hidden_layers",
//                                      "num_key_value_heads", "head_dim" },
//                          "source_parameters": n }                  (parameters of the DLM before pruning)
//   model.safetensors  tensors, names without prefix:
//     embed_tokens.weight [vocab, hidden]        only when embedding == "own" (else the target's is shared)
//     input_layernorm.weight [hidden]
//     q_proj.weight [n_heads·hd, in], k_proj.weight [n_kv·hd, in]   in = 2·hidden (eagle3) or hidden (layer)
//     q_proj.bias, k_proj.bias                   when attention_bias (Qwen2 layer heads)
//     q_norm.weight, k_norm.weight [hd]          when qk_norm (Qwen3 layer heads)
//     fc.weight [hidden, 3·target_hidden], hidden_norm.weight [hidden]   eagle3 only
//     fc.bias [hidden]                           eagle3 with "fc_bias": true (SGLang drafts with `bias`)
//     fc_norm.weight [3·target_hidden]           eagle3 with "fc_input_norm": RMSNorm weights of the fused
//                                                features before fc: "per_layer" (EAGLE-3.1 fc_norm: each
//                                                target layer's third normalised on its own) or "whole"
//                                                (speculators norm_before_fc: one norm over all three)
// Heads using fc_bias or fc_input_norm are written as format_version 2 (older builds refuse them instead of
// computing without them); every other head stays version 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/io/model_config.h"

namespace specontext {

enum class RetrievalHeadKind : uint8_t { kEagle3, kLayer };

/// How an eagle3 head normalises the fused target features before fc (see fc_norm.weight above).
enum class FusedNorm : uint8_t {
  kNone,
  kPerLayer,  // concat(RMSNorm_i(h_i)): EAGLE-3.1 fc_norm, one weight [target_hidden] per fused layer
  kWhole,     // RMSNorm(concat(h_a, h_b, h_c)): speculators norm_before_fc, one weight [3·target_hidden]
};

struct RetrievalHeadTarget {
  std::string name;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
};

struct RetrievalHeadConfig {
  static constexpr int kFormatVersion = 1;     // heads without the fields below
  static constexpr int kMaxFormatVersion = 2;  // fc_bias / fused_norm
  RetrievalHeadKind kind = RetrievalHeadKind::kLayer;
  ModelConfig attn;             // the head's own attention dims, norm eps, RoPE (num_hidden_layers = 1)
  bool own_embedding = true;    // false: use the target's model.embed_tokens.weight
  std::vector<int64_t> fusion_layers;  // eagle3: 3 target layer ids
  FusedNorm fused_norm = FusedNorm::kNone;  // eagle3: fc_norm.weight before fc
  bool fc_bias = false;                     // eagle3: fc.bias
  RetrievalHeadTarget target;
  int64_t source_parameters = 0;

  /// Width of the q/k projection input: 2·hidden (eagle3) or hidden (layer).
  int64_t proj_in() const { return kind == RetrievalHeadKind::kEagle3 ? 2 * attn.hidden_size : attn.hidden_size; }
  /// The format_version this head is written with.
  int format_version() const { return fused_norm != FusedNorm::kNone || fc_bias ? 2 : kFormatVersion; }
};

/// Parses config.json text. InvalidArgument naming the offending field.
absl::StatusOr<RetrievalHeadConfig> ParseRetrievalHeadConfig(const std::string& json_text);
std::string RetrievalHeadConfigToJson(const RetrievalHeadConfig& config);

/// Checks that the head can serve `target`: same vocabulary size, the recorded target dims equal the
/// model's, one KV head of the head per KV head of the model (head-level selection), fusion layers
/// inside the model. FailedPrecondition with a message naming the mismatch.
absl::Status ValidateHeadForTarget(const RetrievalHeadConfig& head, const ModelConfig& target);

/// The default EAGLE-3 fusion layers of an L-layer target: {2, L/2, L-3} (inputs of those layers; SafeAILab,
/// SGLang and vLLM agree), clamped into [0, L) for toy targets.
std::vector<int64_t> DefaultFusionLayers(int64_t n_layers);

}  // namespace specontext
