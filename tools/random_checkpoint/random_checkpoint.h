// Random HF-format checkpoints with real model shapes (library behind specontext-random-checkpoint).
//
// A checkpoint directory holds config.json, generation_config.json, model.safetensors (or shards plus
// model.safetensors.index.json) and a byte-level BPE tokenizer.json whose size equals vocab_size.
// Weights are deterministic in the seed and independent of the thread count.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/io/model_config.h"
#include "core/io/safetensors.h"

namespace specontext {

/// Names accepted by RandomCheckpointPreset, in a stable order.
std::vector<std::string> RandomCheckpointPresetNames();

/// The config of a preset ("llama-3.1-8b", "tiny-qwen3", ...). InvalidArgument listing the presets
/// when unknown.
absl::StatusOr<ModelConfig> RandomCheckpointPreset(std::string_view name);

struct RandomCheckpointOptions {
  DType dtype = DType::kBF16;                  // stored dtype of every tensor (f32, f16 or bf16)
  uint64_t seed = 0;
  uint64_t shard_size_bytes = 4096ull << 20;   // more than this -> shards + index json
  int num_threads = 0;                         // 0: hardware concurrency
  bool write_tokenizer = true;
  int64_t tokenizer_vocab = 0;                 // 0: vocab_size; else <= vocab_size
  bool progress = false;                       // progress lines on stderr
  /// Test hook: edits the tensor list (rename, reshape, drop) before anything is written.
  std::function<void(std::vector<TensorSpec>*)> edit_specs;
};

/// Writes a random checkpoint for `config` into `out_dir` (created if needed). The config is
/// validated first (round-tripped through ParseModelConfig).
absl::Status WriteRandomCheckpoint(const ModelConfig& config, const std::string& out_dir,
                                   const RandomCheckpointOptions& options);

/// Writes random tensors `specs` (values as WriteRandomCheckpoint draws them) as model.safetensors, or
/// shards plus model.safetensors.index.json, into `out_dir`, replacing earlier weight files there.
absl::Status WriteRandomTensors(std::vector<TensorSpec> specs, const std::string& out_dir,
                                const RandomCheckpointOptions& options);

/// Shape of an EAGLE-3 draft for a target: hidden/heads/head_dim/intermediate of the target, one layer,
/// a reduced LM-head vocabulary (32000 for Llama-3 sizes).
struct Eagle3DraftShape {
  int64_t hidden = 0, intermediate = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, draft_vocab = 0;
};
Eagle3DraftShape Eagle3DraftShapeFor(const ModelConfig& target);
/// The tensors of an EAGLE-3 draft checkpoint: fc.weight [h, 3h], midlayer.{hidden_norm, input_layernorm,
/// post_attention_layernorm}.weight [h], midlayer.self_attn.{q,k,v}_proj.weight [*, 2h], o_proj [h, q],
/// midlayer.mlp.{gate,up,down}_proj.weight, norm.weight [h], lm_head.weight [draft_vocab, h].
std::vector<TensorSpec> Eagle3DraftTensors(const Eagle3DraftShape& shape, DType dtype);
/// Writes a random EAGLE-3 draft for `target` into `out_dir`: config.json (architectures
/// ["LlamaForCausalLMEagle3"], draft_vocab_size, YaRN from 2K positions to the target's context,
/// eagle_config.eagle_aux_hidden_state_layer_ids = [2, L/2, L-3]) and the tensors above. No tokenizer
/// (drafts share the target's). Llama targets only.
absl::Status WriteRandomEagle3Draft(const ModelConfig& target, const std::string& out_dir,
                                    const RandomCheckpointOptions& options);

/// A special token of a generated tokenizer.
struct SpecialToken {
  int64_t id;
  std::string content;
};

/// A valid HF byte-level BPE tokenizer.json of exactly `vocab_size` ids: 256 byte tokens (id = byte
/// value), merges learned on an embedded English sample (ids 256...) until no pair repeats or
/// `max_merges` is reached or an id in `specials` is hit, `specials` as added tokens, and every other
/// id as "<|reserved_special_token_N|>". When `bos_content` is non-empty a TemplateProcessing
/// post-processor prepends that token.
absl::StatusOr<std::string> MakeByteLevelBpeTokenizerJson(int64_t vocab_size, const std::vector<SpecialToken>& specials,
                                                          const std::string& bos_content, int max_merges = 8000);

/// Special tokens a preset-like config gets: its bos and eos ids with Llama-3 or Qwen names.
std::vector<SpecialToken> DefaultSpecialTokens(const ModelConfig& config);

}  // namespace specontext
