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

/// How the weights are stored: safetensors (HF's default) or torch.save archives (pytorch_model.bin, as
/// SafeAILab's drafts and save_pretrained(safe_serialization=False) ship them).
enum class WeightsFormat : uint8_t { kSafetensors, kPytorchBin };

struct RandomCheckpointOptions {
  DType dtype = DType::kBF16;                  // stored dtype of every floating tensor (f32, f16 or bf16)
  WeightsFormat format = WeightsFormat::kSafetensors;
  uint64_t seed = 0;
  uint64_t shard_size_bytes = 4096ull << 20;   // more than this -> shards + index json
  int num_threads = 0;                         // 0: hardware concurrency
  bool write_tokenizer = true;
  int64_t tokenizer_vocab = 0;                 // 0: vocab_size; else <= vocab_size
  bool progress = false;                       // progress lines on stderr
  /// Test hook: edits the tensor list (rename, reshape, drop) before anything is written.
  std::function<void(std::vector<TensorSpec>*)> edit_specs;
  /// Fills elements [first, first + count) of a tensor that is not random (e.g. an EAGLE-3 draft's d2t/t2d
  /// vocabulary maps); returns false to leave it to the random fill.
  std::function<bool(const TensorSpec&, int64_t first, int64_t count, void* dst)> special_fill;
};

/// Writes a random checkpoint for `config` into `out_dir` (created if needed). The config is
/// validated first (round-tripped through ParseModelConfig).
absl::Status WriteRandomCheckpoint(const ModelConfig& config, const std::string& out_dir,
                                   const RandomCheckpointOptions& options);

/// Writes random tensors `specs` (values as WriteRandomCheckpoint draws them) as model.safetensors, or
/// shards plus model.safetensors.index.json (WeightsFormat::kPytorchBin: pytorch_model.bin, or shards of at
/// most 2 GiB plus pytorch_model.bin.index.json), into `out_dir`, replacing earlier weight files there.
absl::Status WriteRandomTensors(std::vector<TensorSpec> specs, const std::string& out_dir,
                                const RandomCheckpointOptions& options);

/// EAGLE-3 drafts in each publisher's real layout (what `specontext prune --kind eagle3` reads; the facts and
/// their sources are in core/sparse/eagle3_draft.h):
///  kSafeAILab    yuhuili/EAGLE3-*: config as SafeAILab/EAGLE eagle/traineagle3/config.json (LlamaForCausalLM,
///                max_position_embeddings 2048, no rope_theta: trained with base 10000), pytorch_model.bin in f16
///                (torch.save), midlayer.*, fc, norm, lm_head, d2t (int64), t2d (bool). Llama targets.
///  kSpecForge    lmsys/sglang-EAGLE3-*: LlamaForCausalLMEagle3, max_position_embeddings 2048, rope_theta of
///                the target (absent for Llama targets, as SpecForge configs/llama3-8B-eagle3.json: 10000),
///                eagle_config.eagle_aux_hidden_state_layer_ids [1, L/2-1, L-4] (layer outputs), model.safetensors
///                bf16 with BOOL t2d, I64 d2t, no embedding.
///  kEagle31      SpecForge EAGLE-3.1 (configs/qwen3-30B-A3B-eagle3.1.json): kSpecForge + fc_norm, norm_output and
///                fc_norm.{0,1,2}.weight.
///  kSpeculators  vLLM speculators (RedHatAI/*speculator.eagle3): Eagle3Speculator, the target's config as
///                transformer_layer_config (one layer; its RoPE incl. scaling), top-level
///                eagle_aux_hidden_state_layer_ids [2, L/2, L-3] (layer inputs), layers.0.* (q/k norms for Qwen3),
///                the verifier's embed_tokens.weight, BOOL t2d, I64 d2t. Llama and Qwen3 targets.
enum class Eagle3Layout : uint8_t { kSafeAILab, kSpecForge, kEagle31, kSpeculators };
/// "safeailab", "specforge", "eagle3.1", "speculators".
absl::StatusOr<Eagle3Layout> ParseEagle3Layout(std::string_view name);
/// The dtype a publisher ships: f16 (SafeAILab), bf16 (the others).
DType Eagle3LayoutDType(Eagle3Layout layout);

/// Shape of an EAGLE-3 draft for a target: hidden/heads/head_dim/intermediate of the target, one layer,
/// a reduced LM-head vocabulary (32000 for Llama-3 sizes).
struct Eagle3DraftShape {
  int64_t hidden = 0, intermediate = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, draft_vocab = 0, vocab = 0;
  bool qk_norm = false;  // kSpeculators drafts of Qwen3 targets
};
Eagle3DraftShape Eagle3DraftShapeFor(const ModelConfig& target, Eagle3Layout layout = Eagle3Layout::kSpecForge);
/// The tensors of a draft in `layout`: fc.weight [h, 3h]; the layer (midlayer.* or layers.0.*): hidden_norm,
/// input_layernorm, post_attention_layernorm [h], self_attn.{q,k,v}_proj.weight [*, 2h], o_proj [h, q],
/// mlp.{gate,up,down}_proj.weight (+ q_norm/k_norm [hd]); norm.weight [h], lm_head.weight [draft_vocab, h],
/// fc_norm.{0,1,2}.weight [h] (kEagle31), embed_tokens.weight [vocab, h] (kSpeculators), d2t i64 [draft_vocab],
/// t2d bool [vocab]. Floating tensors in `dtype`.
std::vector<TensorSpec> Eagle3DraftTensors(const Eagle3DraftShape& shape, DType dtype,
                                           Eagle3Layout layout = Eagle3Layout::kSpecForge);
/// Writes a random EAGLE-3 draft for `target` in `layout` into `out_dir`: its config.json and the tensors
/// above (d2t/t2d a real vocabulary map: draft id i is target id floor(i · vocab / draft_vocab)). No tokenizer
/// (drafts share the target's). `options.dtype` and `options.format` are set from the layout by the caller
/// (Eagle3LayoutDType; kSafeAILab is always pytorch_model.bin).
absl::Status WriteRandomEagle3Draft(const ModelConfig& target, const std::string& out_dir,
                                    const RandomCheckpointOptions& options,
                                    Eagle3Layout layout = Eagle3Layout::kSpecForge);

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
