// Random EAGLE-3 draft checkpoints (the layout `specontext prune --kind eagle3` reads): one Llama decoder
// layer ("midlayer") whose attention takes [embedding ‖ fused features] (2·hidden wide), the `fc` fusion of
// three target layers' hidden states (3·hidden → hidden), its own final norm and a reduced-vocabulary LM head.
// Real drafts (e.g. EAGLE3-LLaMA3.1-Instruct-8B) also hold d2t/t2d vocabulary maps; they are integer/bool
// tensors the pruner drops, so they are left out here.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {

Eagle3DraftShape Eagle3DraftShapeFor(const ModelConfig& target) {
  Eagle3DraftShape s;
  s.hidden = target.hidden_size;
  s.intermediate = target.intermediate_size;
  s.n_heads = target.num_attention_heads;
  s.n_kv_heads = target.num_key_value_heads;
  s.head_dim = target.head_dim;
  // EAGLE-3 drafts of Llama-3 predict over a 32000-token subset of the 128256-token vocabulary.
  s.draft_vocab = std::min<int64_t>(32000, std::max<int64_t>(1, target.vocab_size / 4));
  return s;
}

std::vector<TensorSpec> Eagle3DraftTensors(const Eagle3DraftShape& s, DType dtype) {
  const int64_t h = s.hidden, q = s.n_heads * s.head_dim, kv = s.n_kv_heads * s.head_dim;
  return {{"fc.weight", dtype, {h, 3 * h}},
          {"midlayer.hidden_norm.weight", dtype, {h}},
          {"midlayer.input_layernorm.weight", dtype, {h}},
          {"midlayer.self_attn.q_proj.weight", dtype, {q, 2 * h}},
          {"midlayer.self_attn.k_proj.weight", dtype, {kv, 2 * h}},
          {"midlayer.self_attn.v_proj.weight", dtype, {kv, 2 * h}},
          {"midlayer.self_attn.o_proj.weight", dtype, {h, q}},
          {"midlayer.post_attention_layernorm.weight", dtype, {h}},
          {"midlayer.mlp.gate_proj.weight", dtype, {s.intermediate, h}},
          {"midlayer.mlp.up_proj.weight", dtype, {s.intermediate, h}},
          {"midlayer.mlp.down_proj.weight", dtype, {h, s.intermediate}},
          {"norm.weight", dtype, {h}},
          {"lm_head.weight", dtype, {s.draft_vocab, h}}};
}

absl::Status WriteRandomEagle3Draft(const ModelConfig& target, const std::string& out_dir,
                                    const RandomCheckpointOptions& options) {
  if (!IsFloating(options.dtype)) return absl::InvalidArgumentError("draft dtype must be f32, f16 or bf16");
  if (target.arch != Architecture::kLlama) {
    return absl::InvalidArgumentError("EAGLE-3 drafts are written for Llama-architecture targets");
  }
  const Eagle3DraftShape s = Eagle3DraftShapeFor(target);
  // Start from the target's config (Llama attention, eps, theta, special ids), then the draft's fields.
  ModelConfig base = target;
  base.num_hidden_layers = 1;
  base.tie_word_embeddings = false;
  nlohmann::json j = nlohmann::json::parse(ModelConfigToJson(base));
  j["architectures"] = {"LlamaForCausalLMEagle3"};
  j["draft_vocab_size"] = s.draft_vocab;
  j["torch_dtype"] = options.dtype == DType::kF32 ? "float32" : options.dtype == DType::kF16 ? "float16" : "bfloat16";
  // Drafts are trained at 2K positions; YaRN stretches them to the target's context (as in the paper).
  const int64_t trained = std::min<int64_t>(2048, target.max_position_embeddings);
  j["max_position_embeddings"] = target.max_position_embeddings;
  if (target.max_position_embeddings > trained) {
    j["rope_scaling"] = {{"rope_type", "yarn"},
                         {"factor", static_cast<double>(target.max_position_embeddings) / trained},
                         {"original_max_position_embeddings", trained},
                         {"beta_fast", 32.0},
                         {"beta_slow", 1.0}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  std::vector<int64_t> fusion;
  const int64_t L = target.num_hidden_layers;
  for (int64_t l : {int64_t{2}, L / 2, L - 3}) fusion.push_back(std::clamp<int64_t>(l, 0, L - 1));
  std::sort(fusion.begin(), fusion.end());
  j["eagle_config"] = {{"eagle_aux_hidden_state_layer_ids", fusion}};

  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  {
    std::ofstream f(fs::path(out_dir) / "config.json", std::ios::trunc);
    f << j.dump(2) << "\n";
    f.close();
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", out_dir, "/config.json"));
  }
  RandomCheckpointOptions o = options;
  o.write_tokenizer = false;
  return WriteRandomTensors(Eagle3DraftTensors(s, options.dtype), out_dir, o);
}

}  // namespace specontext
