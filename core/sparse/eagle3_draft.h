// EAGLE-3 drafts as their publishers ship them: which files, which tensor names, which config keys,
// and what each publisher means by them. `specontext prune --kind eagle3` reads a draft through
// this and keeps the parts the retrieval head uses (retrieval_head.h). Facts, each from the
// publisher's own code:
//
// SafeAILab (the EAGLE authors; yuhuili/EAGLE3-*): config.json (LlamaForCausalLM, draft_vocab_size,
//   max_position_embeddings 2048, no rope_theta) + pytorch_model.bin (torch.save, f16), tensors
//   fc.*, midlayer.*, norm, lm_head, d2t (int64), t2d (bool). Fusion: the residual ENTERING layers
//   2, L/2 and L-3 (SafeAILab/EAGLE eagle/traineagle3/modeling_llama_kv.py: `if
//   idx==len(self.layers)-3 or idx==len(self.layers)//2 or idx==2: all_hidden_states +=
//   (hidden_states,)` before the layer runs); no config key. RoPE: training always used base 10000
//   whatever the config says (eagle/traineagle3/cnets.py LlamaAttention._init_rope builds
//   LlamaRotaryEmbedding(head_dim, max_position_embeddings) without base), trained at 2048
//   positions without scaling.
// SpecForge / SGLang (lmsys/sglang-EAGLE3-*, and NVIDIA ModelOpt's official export, which writes
// the same
//   names: modelopt/torch/export/plugins/hf_spec_export.py): config.json (LlamaForCausalLMEagle3) +
//   model.safetensors with midlayer.*, fc.*, norm, lm_head, t2d (BOOL), d2t (I64), no embedding
//   (specforge/export/to_sglang.py). `eagle_config.eagle_aux_hidden_state_layer_ids` are layer
//   OUTPUTS: SGLang captures the input of layer id + 1 (python/sglang/srt/models/llama.py
//   set_eagle3_layers_to_capture:
//   `[val + 1 for val in layer_ids]`); SpecForge's default is [1, L/2-1, L-4]
//   (specforge/algorithms/model_providers.py resolve_eagle_capture_layers), ModelOpt's the same
//   (forward hooks on those layers' outputs, modelopt/torch/speculative/plugins/transformers.py).
//   Without ids SGLang uses inputs [2, L/2, L-3]. RoPE from the config (rope_theta, default 10000;
//   rope_scaling honoured: specforge/modeling/draft/llama3_eagle.py LlamaAttention._init_rope).
//   `fc_norm: true` (EAGLE-3.1) adds fc_norm.{0,1,2}.weight, one RMSNorm per fused layer before fc
//   (LlamaForCausalLMEagle3.project_hidden_states); SGLang's loader reads an fc bias when the
//   config says `bias: true` (models/llama_eagle3.py).
// vLLM speculators (RedHatAI/*speculator.eagle3, nm-testing/*-converted): config.json
// (Eagle3Speculator,
//   speculators_model_type "eagle3", the layer's HF config nested in `transformer_layer_config`
//   (llama or qwen3: q/k norms), speculators_config, top-level eagle_aux_hidden_state_layer_ids,
//   norm_before_fc, fc_norm, norm_before_residual, target_hidden_size) + model.safetensors with
//   layers.0.*, fc.*, fc_norm.N / input_norm (vllm-project/speculators
//   src/speculators/models/eagle3/{config,core, model_definitions}.py). The ids are HF
//   hidden_states indices, i.e. layer INPUTS: vLLM appends `hidden_states + residual` before
//   running layer idx when `idx in self.aux_hidden_state_layers`
//   (vllm/model_executor/models/llama.py); default (2, L/2, L-3).
// Also accepted: a `model.` prefix on any name (TensorRT-LLM/AutoDeploy and some exports:
// model.fc.weight), ModelOpt's raw names (layers.0.*, top-level hidden_norm / input_embeds_norm),
// midlayer.0.* (multi-layer drafts; the first layer is the one that reads embedding ⊕ fused
// features).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/io/model_config.h"
#include "core/io/weight_source.h"
#include "core/sparse/retrieval_head_config.h"

namespace specontext {

enum class DraftPublisher : uint8_t { kSafeAILab, kSpecForge, kSpeculators };
std::string_view DraftPublisherName(DraftPublisher p);
/// "safeailab", "specforge" (also "sglang", "modelopt") or "speculators" (also "vllm").
absl::StatusOr<DraftPublisher> ParseDraftPublisher(std::string_view name);

/// The tensors of a draft that the retrieval head keeps, by their names in the draft ("" when
/// absent).
struct Eagle3DraftNames {
  std::string fc, fc_bias, hidden_norm, input_layernorm, q_proj, k_proj, q_bias, k_bias, q_norm,
      k_norm;
  std::vector<std::string> fused_norm;  // kPerLayer: 3 names; kWhole: 1
};

struct Eagle3Draft {
  DraftPublisher publisher = DraftPublisher::kSpecForge;
  bool publisher_detected = true;  // false when forced by the caller
  std::string weights_file;        // which of kWeightFileNames was read
  std::unique_ptr<WeightSource> weights;
  ModelConfig attn;               // the first draft layer's attention (arch: llama, qwen2/3), RoPE
                                  // as the publisher trained it
  std::string rope_note;          // where attn.rope_theta / rope_scaling came from
  int64_t trained_positions = 0;  // the draft config's max_position_embeddings
  std::vector<int64_t> fusion_layers;  // target hidden_states indices (inputs of those layers)
  std::string fusion_note;             // where they came from, and the conversion applied
  FusedNorm fused_norm = FusedNorm::kNone;
  Eagle3DraftNames names;
  int64_t draft_layers = 1;  // num_hidden_layers of the draft (only the first is kept)
};

/// Reads the draft in `dir` for `target`: finds its weight files, detects the publisher (or uses
/// `*forced`), parses its config, resolves the fusion layers in that publisher's convention and
/// every tensor name. Tensor shapes are not checked here (PruneToRetrievalHead does, naming tensor
/// and shapes).
absl::StatusOr<Eagle3Draft> OpenEagle3Draft(const std::string& dir, const ModelConfig& target,
                                            const DraftPublisher* forced = nullptr);

}  // namespace specontext
