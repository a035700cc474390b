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
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/io/model_config.h"

namespace specontext {

enum class RetrievalHeadKind : uint8_t { kEagle3, kLayer };

struct RetrievalHeadTarget {
  std::string name;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
};

struct RetrievalHeadConfig {
  static constexpr int kFormatVersion = 1;
  RetrievalHeadKind kind = RetrievalHeadKind::kLayer;
  ModelConfig attn;             // the head's own attention dims, norm eps, RoPE (num_hidden_layers = 1)
  bool own_embedding = true;    // false: use the target's model.embed_tokens.weight
  std::vector<int64_t> fusion_layers;  // eagle3: 3 target layer ids
  RetrievalHeadTarget target;
  int64_t source_parameters = 0;

  /// Width of the q/k projection input: 2·hidden (eagle3) or hidden (layer).
  int64_t proj_in() const { return kind == RetrievalHeadKind::kEagle3 ? 2 * attn.hidden_size : attn.hidden_size; }
};

/// Parses config.json text. InvalidArgument naming the offending field.
absl::StatusOr<RetrievalHeadConfig> ParseRetrievalHeadConfig(const std::string& json_text);
std::string RetrievalHeadConfigToJson(const RetrievalHeadConfig& config);

/// Checks that the head can serve `target`: same vocabulary size, the recorded target dims equal the
/// model's, one KV head of the head per KV head of the model (head-level selection), fusion layers
/// inside the model. FailedPrecondition with a message naming the mismatch.
absl::Status ValidateHeadForTarget(const RetrievalHeadConfig& head, const ModelConfig& target);

/// The default EAGLE-3 fusion layers of an L-layer target: {2, L/2, L-3}.
std::vector<int64_t> DefaultFusionLayers(int64_t n_layers);

}  // namespace specontext
